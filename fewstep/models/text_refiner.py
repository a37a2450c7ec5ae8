"""A text-token refiner for cross-attention DiTs: learned token positions plus a few
pre-norm self-attention blocks over the text encoder's tokens, so that each token can absorb
its neighbours (which colour word precedes which shape word, which noun comes first) before the
image attends to it. Cross-attention alone sees the caption as a set of nearly context-free
tokens; small encoders such as MiniLM change a shape word's vector by only ~10 % between "a
red square" and "a green square". HunyuanVideo's token refiner (Kong et al. 2024, §3.3) and
MMDiT's joint text stream (Esser et al. 2024) serve the same purpose.

It acts on the encoder's tokens before the DiT's caption projection, as a residual
x + out(blocks(in(x) + positions)) at its own width, so it is separable: an exported pipeline
applies it to the prompt embeddings and keeps a stock PixArt-Σ transformer. Its output
projection and every block's residual outputs start at zero, so adding a refiner to a trained
DiT leaves its function unchanged until the refiner trains (a function-preserving graft)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fewstep.models.attention import attention


def alibi_bias(num_heads: int, length: int, device: torch.device | None = None) -> Tensor:
    """ALiBi attention bias (Press et al. 2022, §3) for an encoder: -m_h |i - j| for head h of
    ``num_heads`` with slopes m_h = 2^(-8h/H), h = 1..H; [1, H, L, L] float32. Each head prefers
    nearby tokens at its own range, so a shape word sees its own colour word first."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, device=device) / num_heads)
    position = torch.arange(length, device=device, dtype=torch.float32)
    distance = (position[None, :] - position[:, None]).abs()
    return (-slopes[:, None, None] * distance).unsqueeze(0)


DIRECTION_PENALTY = 10.0  # logit cost of a key on a directional head's blind side (e^-10)


def directional_alibi(num_heads: int, max_tokens: int) -> Tensor:
    """Initial signed-offset table [H, 2M - 1] of ``RelativePositionBias``: ALiBi's -m_h |d|
    (Press et al. 2022) for offset d = j - i, plus ``DIRECTION_PENALTY`` on keys after the query
    for even heads and before it for odd heads, so half the heads read what precedes a word and
    half what follows it ("circle" before "left of" differs from "square" after it)."""
    offsets = torch.arange(-(max_tokens - 1), max_tokens, dtype=torch.float32)
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1) / num_heads)
    table = -slopes[:, None] * offsets.abs()[None, :]
    backward = torch.arange(num_heads) % 2 == 0
    blind = torch.where(backward[:, None], offsets[None, :] > 0, offsets[None, :] < 0)
    return table - DIRECTION_PENALTY * blind.float()


class RelativePositionBias(nn.Module):
    """A learned attention bias per head and signed token offset (T5's relative bias, Raffel et
    al. 2020 §2.1, without buckets: the refiner's offsets are few), initialised as
    ``directional_alibi``; shared by all blocks."""

    def __init__(self, num_heads: int, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens
        self.table = nn.Parameter(directional_alibi(num_heads, max_tokens))

    def reset_parameters(self) -> None:
        """Back to the directional ALiBi table."""
        with torch.no_grad():
            self.table.copy_(directional_alibi(self.table.shape[0], self.max_tokens))

    def forward(self, length: int) -> Tensor:
        """The bias [1, H, L, L] for ``length`` tokens: table[h, j - i]."""
        position = torch.arange(length, device=self.table.device)
        offset = position[None, :] - position[:, None] + self.max_tokens - 1  # [L, L]
        return self.table[:, offset].unsqueeze(0)


class LocalMixer(nn.Module):
    """A residual 1-D convolution over neighbouring tokens, h + conv(LN(h)) (the short
    convolution of H3/Hyena, Fu et al. 2023, and Mamba, Gu & Dao 2023, here dense across
    channels): each token receives its ``kernel // 2`` neighbours on either side through a linear
    map per offset, so "square" in "a red square" is given "red" by position, not looked up by
    content. Padded tokens are zeroed before the convolution; zero-initialised (identity)."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        if kernel < 3 or kernel % 2 == 0:
            raise ValueError(
                f"TextRefiner: conv kernel {kernel} must be odd and >= 3 "
                "(set DiT.text_refiner_conv: 0 for none)"
            )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2)

    def reset_parameters(self) -> None:
        """Zero convolution: the identity."""
        nn.init.zeros_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: Tensor, valid: Tensor | None) -> Tensor:
        """Tokens [B, L, D], key-padding mask [B, L] (True = token) or None -> [B, L, D]."""
        x = self.norm(h)
        if valid is not None:
            x = x * valid[..., None].to(x.dtype)
        return h + self.conv(x.transpose(1, 2)).transpose(1, 2)


class RefinerBlock(nn.Module):
    """Pre-norm transformer encoder block (Xiong et al. 2020) with zero-initialised outputs."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"TextRefiner: dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )

    def forward(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """Tokens [B, L, D], additive bias ([B, 1, 1, L] key padding, [B, H, L, L] with ALiBi)
        or None -> [B, L, D]."""
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, hd]
        mask = None if bias is None else bias.to(q.dtype)
        out = attention(q, k, v, mask)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class TextRefiner(nn.Module):
    """Text tokens [B, L, C] -> refined tokens [B, L, C]: x + out(blocks(in(x) + positions)),
    ``depth`` blocks at width ``dim``; the identity at initialisation."""

    def __init__(
        self,
        channels: int,
        dim: int,
        num_heads: int,
        depth: int,
        max_tokens: int,
        position_std: float = 0.02,
        alibi: bool = False,
        relative: bool = False,
        conv: int = 0,
    ):
        """``position_std``: the initial positions' std (init only, not part of ``config``).
        Near the tokens' own scale, word order is visible from the first step: at 0.02 against
        MiniLM tokens projected to rms ~0.5, a refiner trained 6,000 steps kept positions 65x
        below the content and learned no order (docs/reference_teacher.md). ``alibi`` adds
        ALiBi's distance penalty to every block's attention (``alibi_bias``): locality from the
        first step, where the trained refiner's heads picked colour words by content alone.
        ``relative`` adds a learned per-head bias on the signed token offset
        (``RelativePositionBias``, directional from the first step); it replaces ``alibi``.
        ``conv`` > 0 mixes each token with its neighbours first (``LocalMixer``, that kernel)."""
        super().__init__()
        if alibi and relative:
            raise ValueError(
                "TextRefiner: alibi and relative are exclusive (the relative bias starts as a "
                "directional ALiBi); set one of DiT.text_refiner_alibi / text_refiner_relative"
            )
        if position_std <= 0:
            raise ValueError(f"TextRefiner: position_std={position_std} must be > 0")
        self.position_std = position_std
        if depth < 1 or max_tokens < 1:
            raise ValueError(
                f"TextRefiner: depth={depth} and max_tokens={max_tokens} must be >= 1 "
                "(set DiT.text_refiner_depth: 0 for no refiner)"
            )
        self.config = dict(
            channels=channels, dim=dim, num_heads=num_heads, depth=depth, max_tokens=max_tokens
        )
        if alibi:  # only when set, so configs (and exports) of refiners without it are unchanged
            self.config["alibi"] = True
        if relative:
            self.config["relative"] = True
        if conv:
            self.config["conv"] = conv
        self.mixer = LocalMixer(dim, conv) if conv else None
        self.alibi = alibi
        self.relative_bias = RelativePositionBias(num_heads, max_tokens) if relative else None
        self.num_heads = num_heads
        self.proj_in = nn.Linear(channels, dim)
        self.positions = nn.Parameter(torch.zeros(max_tokens, dim))
        self.blocks = nn.ModuleList(RefinerBlock(dim, num_heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, eps=1e-6)
        self.proj_out = nn.Linear(dim, channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, position_std²) positions, zero residual outputs (identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.positions, std=self.position_std)
        if self.relative_bias is not None:
            self.relative_bias.reset_parameters()
        if self.mixer is not None:
            self.mixer.reset_parameters()
        for block in self.blocks:
            nn.init.zeros_(block.proj.weight)
            nn.init.zeros_(block.mlp[2].weight)
        nn.init.zeros_(self.proj_out.weight)

    def forward(self, tokens: Tensor, bias: Tensor | None) -> Tensor:
        """Refine ``tokens`` [B, L, C]; ``bias`` masks padded keys ([B, 1, 1, L], 0 or -1e4)."""
        length = tokens.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(
                f"TextRefiner: {length} text tokens exceed text_refiner_max_tokens="
                f"{self.positions.shape[0]}; raise DiT.text_refiner_max_tokens"
            )
        h = self.proj_in(tokens) + self.positions[:length].to(tokens.dtype)
        if self.mixer is not None:
            h = self.mixer(h, None if bias is None else bias.reshape(bias.shape[0], -1) == 0)
        distance = self.position_bias(length, tokens.device)
        if distance is not None:
            distance = distance.to(tokens.dtype)
            bias = distance if bias is None else bias.to(tokens.dtype) + distance
        for block in self.blocks:
            h = block(h, bias)
        return tokens + self.proj_out(self.norm_out(h))

    def position_bias(self, length: int, device: torch.device) -> Tensor | None:
        """[1, H, L, L] ALiBi or relative bias, or None for a refiner with neither."""
        if self.relative_bias is not None:
            return self.relative_bias(length)
        return alibi_bias(self.num_heads, length, device) if self.alibi else None
