"""Building blocks of the FLUX.1 MMDiT (Black Forest Labs 2024, github.com/black-forest-labs/flux,
src/flux/modules/layers.py): 2x2 latent packing, RoPE ids and 3-axis rotary embedding, joint
attention, double- and single-stream blocks, the last layer. Parameter names are the reference's.
The network itself is ``fewstep.models.flux.Flux``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.models.attention import attention
from fewstep.models.dit import TIMESTEP_FREQ_DIM, modulate

ROPE_THETA = 10000.0  # RoPE base (FLUX.1 EmbedND theta; diffusers FluxPosEmbed)
MLP_RATIO = 4  # MLP width / hidden size in both block kinds (FLUX.1 and diffusers fix it)
PACK = 2  # latents are packed into 2x2 patches (FluxPipeline._pack_latents)
NORM_EPS = 1e-6
Rope = tuple[Tensor, Tensor]  # (cos, sin), each [L + N, head_dim / 2]


# ------------------------------------------------------------------------------ packing and ids


def pack_latents(x: Tensor) -> Tensor:
    """Latents [B, C, H, W] -> tokens [B, H/2 * W/2, 4C], channel-major (FluxPipeline order)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // PACK, PACK, w // PACK, PACK)  # [B, C, h, 2, w, 2]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B, h, w, C, 2, 2]
    return x.reshape(b, (h // PACK) * (w // PACK), c * PACK * PACK)  # [B, N, 4C]


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Tokens [B, H/2 * W/2, 4C] -> latents [B, C, H, W] (inverse of ``pack_latents``)."""
    b, _, d = tokens.shape
    c = d // (PACK * PACK)
    x = tokens.reshape(b, height // PACK, width // PACK, c, PACK, PACK)  # [B, h, w, C, 2, 2]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B, C, h, 2, w, 2]
    return x.reshape(b, c, height, width)  # [B, C, H, W]


def position_ids(
    text_len: int,
    grid_h: int,
    grid_w: int,
    device: torch.device | None = None,
    text_positions: bool = False,
) -> Tensor:
    """RoPE ids [L + h*w, 3]: text tokens at (0, 0, 0), image token (i, j) at (0, i, j)
    (FLUX.1 sampling.prepare; FluxPipeline's txt_ids and _prepare_latent_image_ids). With
    ``text_positions`` text token k sits at (k, 0, 0): joint attention then sees word order on
    the index axis (FLUX.1 leaves order to T5; a small encoder's tokens carry little of it)."""
    img = torch.zeros(grid_h, grid_w, 3, device=device)
    img[..., 1] = torch.arange(grid_h, device=device)[:, None]
    img[..., 2] = torch.arange(grid_w, device=device)[None, :]
    txt = torch.zeros(text_len, 3, device=device)
    if text_positions:
        txt[:, 0] = torch.arange(text_len, device=device)
    return torch.cat([txt, img.reshape(grid_h * grid_w, 3)], dim=0)  # [L + N, 3]


# ------------------------------------------------------------------------------------- RoPE


def rope_angles(ids: Tensor, axes_dim: tuple[int, ...], theta: float = ROPE_THETA) -> Tensor:
    """Rotation angles [S, head_dim / 2]: axis a's position times theta^(-2k/d_a), axes
    concatenated (Su et al. 2021 RoPE, per axis; FLUX.1 EmbedND / diffusers FluxPosEmbed)."""
    dtype = torch.float32 if ids.device.type == "mps" else torch.float64
    parts = []
    for axis, dim in enumerate(axes_dim):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=dtype, device=ids.device) / dim)
        parts.append(torch.outer(ids[:, axis].to(dtype), omega))  # [S, dim/2]
    return torch.cat(parts, dim=-1)  # [S, head_dim/2]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x [B, H, S, hd] by angles with cos/sin [S, hd/2]
    (RoPE, Su et al. 2021 eq. 34), in float32 like the reference."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, H, S, hd/2, 2]
    x0, x1 = pairs.unbind(-1)
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)  # [B,H,S,hd/2,2]
    return out.flatten(-2).to(x.dtype)  # [B, H, S, hd]


def joint_attention(q: Tensor, k: Tensor, v: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
    """RoPE on q, k [B, H, S, hd], then SDPA with a key mask [B, 1, 1, S] -> [B, S, H*hd]."""
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attention(q, k, v, mask)  # [B, H, S, hd]
    return out.transpose(1, 2).flatten(2)  # [B, S, H*hd]


def joint_mask(text_mask: Tensor | None, image_tokens: int) -> Tensor | None:
    """Text padding mask [B, L] (True = valid) -> key mask [B, 1, 1, L + N] over [text; image]."""
    if text_mask is None:
        return None
    valid = text_mask.to(torch.bool)
    image = valid.new_ones(valid.shape[0], image_tokens)
    return torch.cat([valid, image], dim=1)[:, None, None, :]  # [B, 1, 1, L + N]


# ----------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) with the reference's parameter name ``scale``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., dim], normalised over the last axis."""
        return F.rms_norm(x, (x.shape[-1],), self.scale, eps=NORM_EPS)


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys (FLUX.1 QKNorm; Dehghani et al. 2023)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.query_norm = RMSNorm(head_dim)
        self.key_norm = RMSNorm(head_dim)


class MLPEmbedder(nn.Module):
    """Linear, SiLU, Linear: the timestep / guidance / pooled-text embedders (FLUX.1)."""

    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, hidden]."""
        return self.out_layer(F.silu(self.in_layer(x)))


class Modulation(nn.Module):
    """adaLN-Zero parameters from the vector: Linear(SiLU(vec)) -> 3 or 6 chunks of [B, 1, D]
    (shift, scale, gate per sub-layer; Peebles & Xie 2023 Sec. 3.2; FLUX.1 Modulation)."""

    def __init__(self, dim: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.lin = nn.Linear(dim, chunks * dim)

    def forward(self, vec: Tensor) -> tuple[Tensor, ...]:
        """[B, D] -> ``chunks`` tensors [B, 1, D]."""
        return self.lin(F.silu(vec))[:, None, :].chunk(self.chunks, dim=-1)


class StreamAttention(nn.Module):
    """One stream's part of the joint attention: fused QKV with QK-norm, and the output
    projection (FLUX.1 SelfAttention)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Tokens [B, S, D] -> normalised q, k and v, each [B, H, S, hd]."""
        return split_heads(self.qkv(x), self.num_heads, self.norm)


def split_heads(qkv: Tensor, num_heads: int, norm: QKNorm) -> tuple[Tensor, Tensor, Tensor]:
    """Fused [B, S, 3D] -> q, k, v [B, H, S, hd] with q and k RMS-normalised per head."""
    b, s, d3 = qkv.shape
    qkv = qkv.reshape(b, s, 3, num_heads, d3 // (3 * num_heads))  # [B, S, 3, H, hd]
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, S, hd]
    return norm.query_norm(q), norm.key_norm(k), v


def mlp(dim: int) -> nn.Sequential:
    """The GELU-tanh feed-forward of the double blocks (FLUX.1 img_mlp / txt_mlp)."""
    hidden = MLP_RATIO * dim
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
    )


def _norm(dim: int) -> nn.LayerNorm:
    """Affine-free LayerNorm, the modulation supplies scale and shift."""
    return nn.LayerNorm(dim, elementwise_affine=False, eps=NORM_EPS)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: text and image streams with their own weights, attending jointly over
    [text; image] (Esser et al. 2024 Fig. 2b; FLUX.1 DoubleStreamBlock)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.img_mod, self.txt_mod = Modulation(dim, 6), Modulation(dim, 6)
        self.img_norm1, self.txt_norm1 = _norm(dim), _norm(dim)
        self.img_attn = StreamAttention(dim, num_heads)
        self.txt_attn = StreamAttention(dim, num_heads)
        self.img_norm2, self.txt_norm2 = _norm(dim), _norm(dim)
        self.img_mlp, self.txt_mlp = mlp(dim), mlp(dim)

    def forward(
        self, img: Tensor, txt: Tensor, vec: Tensor, rope: Rope, mask: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Image [B, N, D], text [B, L, D], vector [B, D] -> updated (image, text)."""
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)  # 6 x [B, 1, D] each
        img_q, img_k, img_v = self.img_attn.heads(modulate(self.img_norm1(img), *img_mod[:2]))
        txt_q, txt_k, txt_v = self.txt_attn.heads(modulate(self.txt_norm1(txt), *txt_mod[:2]))
        q, k, v = (torch.cat(p, dim=2) for p in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = joint_attention(q, k, v, rope, mask)  # [B, L + N, D]
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = self._residuals(img, img_attn, img_mod, self.img_attn, self.img_norm2, self.img_mlp)
        txt = self._residuals(txt, txt_attn, txt_mod, self.txt_attn, self.txt_norm2, self.txt_mlp)
        return img, txt

    @staticmethod
    def _residuals(
        x: Tensor,
        attn: Tensor,
        mod: tuple[Tensor, ...],
        attention: StreamAttention,
        norm: nn.LayerNorm,
        feed_forward: nn.Module,
    ) -> Tensor:
        """x + gate1 * proj(attn), then x + gate2 * MLP(modulated norm(x)) for one stream
        (mod = shift1, scale1, gate1, shift2, scale2, gate2; the first two were used before)."""
        gate1, shift2, scale2, gate2 = mod[2:]
        x = x + gate1 * attention.proj(attn)
        return x + gate2 * feed_forward(modulate(norm(x), shift2, scale2))


class SingleStreamBlock(nn.Module):
    """Parallel attention + MLP over the joint sequence, one fused input and one fused output
    linear (Dehghani et al. 2023 ViT-22B Sec. 2; FLUX.1 SingleStreamBlock)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.mlp_hidden = MLP_RATIO * dim
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)  # q, k, v and MLP-in
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)  # attention-out and MLP-out
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = _norm(dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, 3)

    def forward(self, x: Tensor, vec: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
        """Joint tokens [B, L + N, D], vector [B, D] -> [B, L + N, D]."""
        shift, scale, gate = self.modulation(vec)
        fused = self.linear1(modulate(self.pre_norm(x), shift, scale))  # [B, S, 3D + M]
        qkv, hidden = fused.split([fused.shape[-1] - self.mlp_hidden, self.mlp_hidden], dim=-1)
        attn = joint_attention(*split_heads(qkv, self.num_heads, self.norm), rope, mask)
        return x + gate * self.linear2(torch.cat([attn, self.mlp_act(hidden)], dim=-1))


class LastLayer(nn.Module):
    """Final adaLN (shift, scale from the vector; no gate), linear to packed channels (FLUX.1)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = _norm(dim)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        """Image tokens [B, N, D], vector [B, D] -> [B, N, out_dim]."""
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)  # [B, 1, D] each
        return self.linear(modulate(self.norm_final(x), shift, scale))


def zero_output_embedder(dim: int, like: Tensor) -> MLPEmbedder:
    """A guidance embedder whose output layer is zero: adding it leaves the network unchanged."""
    embedder = MLPEmbedder(TIMESTEP_FREQ_DIM, dim).to(like.device, like.dtype)
    nn.init.zeros_(embedder.out_layer.weight)
    nn.init.zeros_(embedder.out_layer.bias)
    return embedder
