"""PixArt-Σ latent diffusion transformer (Chen et al. 2024, arXiv:2403.04692; PixArt-α 2310.00426).

The network maps (latent, noise level, text) to an output and knows nothing of schedules. Its
semantics mirror diffusers' ``PixArtTransformer2DModel`` exactly so weights convert both ways
(see ``fewstep.models.dit_convert``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fewstep.models.attention import attention
from fewstep.models.text_refiner import TextRefiner
from fewstep.models.token_features import TokenFeatures

TIMESTEP_FREQ_DIM = 256  # width of the sinusoidal timestep features (PixArt-α / DiT)
MASK_BIAS = -10000.0  # additive attention bias of a padded text token, as diffusers uses


def timestep_embedding(t: Tensor, dim: int = TIMESTEP_FREQ_DIM, max_period: float = 1e4) -> Tensor:
    """Sinusoidal features [cos, sin] of (continuous) timesteps (Vaswani et al. 2017 Sec. 3.5)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / half)  # shift 0: freq_i = max_period^(-i/half)
    args = t[:, None].float() * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def _sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """1-D sin-cos embedding of positions [M] -> [M, dim] (Vaswani et al. 2017 Sec. 3.5)."""
    dtype = torch.float32 if pos.device.type == "mps" else torch.float64
    omega = torch.arange(dim // 2, dtype=dtype, device=pos.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # [dim/2]
    out = torch.outer(pos, omega)  # [M, dim/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # [M, dim]


def sincos_pos_embed_2d(
    dim: int,
    grid_hw: tuple[int, int],
    base_size: int,
    interpolation_scale: float,
    device: torch.device | None = None,
) -> Tensor:
    """2-D sin-cos positions [h*w, dim] with PixArt-α's resolution interpolation (Sec. 2.3, MS).

    Each axis is rescaled to ``base_size`` positions and divided by ``interpolation_scale``; the
    first half of the channels encodes the column, the second the row (as diffusers/MAE).
    """
    h, w = grid_hw
    ys = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # each [h, w]
    emb_x = _sincos_1d(dim // 2, grid_x.reshape(-1))  # [h*w, dim/2]
    emb_y = _sincos_1d(dim // 2, grid_y.reshape(-1))  # [h*w, dim/2]
    return torch.cat([emb_x, emb_y], dim=1).float()  # [h*w, dim]


def text_attention_bias(text_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Key-padding mask [B, L] (True = valid) -> additive bias [B, 1, 1, L] (0 or -1e4)."""
    if text_mask is None:
        return None
    valid = text_mask.to(torch.bool)
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, MASK_BIAS)
    return bias[:, None, None, :]  # [B, 1, 1, L]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x * (1 + scale) + shift (Peebles & Xie 2023, Sec. 3.2)."""
    return x * (1 + scale) + shift


def _head_norm(head_dim: int, enabled: bool) -> nn.Module:
    """Per-head RMSNorm on q or k (QK-norm, Dehghani et al. 2023) or the identity."""
    return nn.RMSNorm(head_dim, eps=1e-6) if enabled else nn.Identity()


class SelfAttention(nn.Module):
    """Multi-head self-attention over image tokens (Vaswani et al. 2017) with a fused QKV."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = _head_norm(dim // num_heads, qk_norm)
        self.k_norm = _head_norm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """Tokens [B, N, D] -> [B, N, D]."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)  # [B,N,3,h,hd]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, N, hd]
        out = attention(self.q_norm(q), self.k_norm(k), v)  # [B, h, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, h, N, hd] -> [B, N, D]


class CrossAttention(nn.Module):
    """Multi-head cross-attention from image tokens to text tokens (PixArt-α Sec. 2.3)."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = _head_norm(dim // num_heads, qk_norm)
        self.k_norm = _head_norm(dim // num_heads, qk_norm)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None) -> Tensor:
        """Tokens [B, N, D], text [B, L, Dc], bias [B, 1, 1, L] or None -> [B, N, D]."""
        b, n, d = x.shape
        hd = d // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)  # [B, h, N, hd]
        kv = self.kv(context).reshape(b, context.shape[1], 2, self.num_heads, hd)  # [B,L,2,h,hd]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, h, L, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        mask = None if bias is None else bias.to(q.dtype)
        out = attention(q, k, v, mask)  # [B, h, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))  # [B, h, N, hd] -> [B, N, D]


class Mlp(nn.Module):
    """Two-layer GELU-tanh MLP (Hendrycks & Gimpel 2016), the ViT/DiT feed-forward."""

    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., out]."""
        return self.fc2(self.act(self.fc1(x)))


class PixArtBlock(nn.Module):
    """PixArt block: adaLN-single self-attn, cross-attn, MLP (PixArt-α Sec. 2.3, Fig. 4)."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, context_dim: int, qk_norm: bool = False
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, num_heads, qk_norm)
        self.cross_attn = CrossAttention(dim, context_dim, num_heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)  # per-block E

    def forward(self, x: Tensor, context: Tensor, t6: Tensor, bias: Tensor | None) -> Tensor:
        """Tokens [B, N, D], text [B, L, Dc], global modulation [B, 6D] -> [B, N, D]."""
        b, _, d = x.shape
        mod = self.scale_shift_table[None] + t6.reshape(b, 6, d)  # [B, 6D] -> [B, 6, D]
        shift_sa, scale_sa, gate_sa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_sa * self.attn(modulate(self.norm1(x), shift_sa, scale_sa))
        x = x + self.cross_attn(x, context, bias)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """Final adaLN-single layer: norm, shift/scale from the timestep embedding, linear (PixArt)."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.linear = nn.Linear(dim, out_dim)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """Tokens [B, N, D], timestep embedding [B, D] -> [B, N, out_dim]."""
        shift, scale = (self.scale_shift_table[None] + emb[:, None]).chunk(2, dim=1)  # [B,1,D]
        return self.linear(modulate(self.norm(x), shift, scale))


def guidance_embedder(dim: int) -> nn.Sequential:
    """The MLP of the optional guidance-scale embedding (shaped like the timestep embedder)."""
    return nn.Sequential(nn.Linear(TIMESTEP_FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))


def init_guidance_embedder(mlp: nn.Sequential) -> None:
    """N(0, 0.02) input layer as the timestep embedder; zero output layer, so that adding the
    embedding leaves the network's function unchanged until it is trained."""
    nn.init.normal_(mlp[0].weight, std=0.02)
    nn.init.zeros_(mlp[0].bias)
    nn.init.zeros_(mlp[2].weight)
    nn.init.zeros_(mlp[2].bias)


class DiT(nn.Module):
    """PixArt-Σ DiT (Chen et al. 2024): x_t [B,C,H,W], t [B], text [B,L,Ct] -> [B,C_out,H,W]."""

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        learn_sigma: bool = True,
        sample_size: int = 128,
        interpolation_scale: float | None = None,
        qk_norm: bool = False,
        gradient_checkpointing: bool = False,
        caption_projection: bool = True,
        guidance_embed: bool = False,
        caption_init_std: float = 0.02,
        text_refiner_depth: int = 0,
        text_refiner_width: int | None = None,
        text_refiner_max_tokens: int = 512,
        text_refiner_position_std: float = 0.02,
        text_refiner_alibi: bool = False,
        text_refiner_relative: bool = False,
        text_refiner_conv: int = 0,
    ) -> None:
        """``caption_init_std``: std of the caption projection's initial weights (PixArt: 0.02,
        sized for T5-XXL's 4096-wide features; with a small encoder such as MiniLM the text path
        then starts near zero, which a larger value may help). ``text_refiner_depth`` > 0 adds a
        ``TextRefiner`` (learned token positions + self-attention over the text tokens at width
        ``text_refiner_width``, default ``hidden_size``; identity at initialisation) before the
        caption projection; 0 is PixArt-Σ exactly. ``text_refiner_position_std``: the std of
        its initial token positions (init only, so not in ``config()``); ``text_refiner_alibi``
        adds ALiBi's distance penalty to its attention, ``text_refiner_relative`` a learned
        directional bias per token offset instead, ``text_refiner_conv`` (an odd kernel) a
        convolution over neighbouring tokens before its blocks (each in ``config()`` only when
        set)."""
        super().__init__()
        if caption_init_std <= 0:
            raise ValueError(f"DiT: caption_init_std={caption_init_std} must be > 0.")
        if hidden_size % num_heads:
            raise ValueError(
                f"DiT: hidden_size={hidden_size} must be divisible by num_heads={num_heads}."
            )
        if hidden_size % 4:
            raise ValueError(
                f"DiT: hidden_size={hidden_size} must be divisible by 4 for the "
                "2-D sin-cos positional embedding."
            )
        self._config = dict(
            in_channels=in_channels,
            patch_size=patch_size,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            caption_channels=caption_channels,
            learn_sigma=learn_sigma,
            sample_size=sample_size,
            interpolation_scale=interpolation_scale,
            qk_norm=qk_norm,
            gradient_checkpointing=gradient_checkpointing,
            caption_projection=caption_projection,
            guidance_embed=guidance_embed,
            caption_init_std=caption_init_std,
            text_refiner_depth=text_refiner_depth,
            text_refiner_width=text_refiner_width,
            text_refiner_max_tokens=text_refiner_max_tokens,
        )
        if text_refiner_alibi:  # only when set: the configs of every other DiT stay as they were
            self._config["text_refiner_alibi"] = True
        if text_refiner_relative:
            self._config["text_refiner_relative"] = True
        if text_refiner_conv:
            self._config["text_refiner_conv"] = text_refiner_conv
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.learn_sigma = learn_sigma
        self.gradient_checkpointing = gradient_checkpointing
        self.base_size = sample_size // patch_size  # the grid side whose positions are 0..base-1
        self.interpolation_scale = (
            interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        )
        self.mlp_hidden = int(hidden_size * mlp_ratio)
        self.context_dim = hidden_size if caption_projection else caption_channels

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = nn.Sequential(
            nn.Linear(TIMESTEP_FREQ_DIM, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.g_embedder = guidance_embedder(hidden_size) if guidance_embed else None
        self.y_embedder = (
            Mlp(caption_channels, hidden_size, hidden_size) if caption_projection else None
        )
        self.text_refiner = (
            TextRefiner(
                caption_channels,
                text_refiner_width or hidden_size,
                num_heads,
                text_refiner_depth,
                text_refiner_max_tokens,
                text_refiner_position_std,
                text_refiner_alibi,
                text_refiner_relative,
                text_refiner_conv,
            )
            if text_refiner_depth > 0
            else None
        )
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, self.mlp_hidden, self.context_dim, qk_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size * patch_size * self.out_channels)
        self._pos_cache: dict[tuple[int, int, str], Tensor] = {}
        self.initialize_weights()

    @property
    def out_channels(self) -> int:
        """Output channels: ε (and the variance interpolation v when learning Σ, Nichol 2021)."""
        return 2 * self.in_channels if self.learn_sigma else self.in_channels

    def config(self) -> dict:
        """The init arguments (for fingerprints and export)."""
        return dict(self._config)

    def token_features(self) -> TokenFeatures:
        """The blocks whose outputs [B, N, D] are the image tokens on the patch grid (features of
        LADD's and DMD2's discriminator heads)."""
        caption = self._config["caption_channels"]
        return TokenFeatures(list(self.blocks), self.hidden_size, caption, self.patch_size)

    def initialize_weights(self) -> None:
        """PixArt-α init: xavier linears, N(0, 0.02) embedders, zero cross-attn out and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # conv as a linear: [D, C*p*p]
        nn.init.zeros_(self.x_embedder.bias)
        for linear in (self.t_embedder[0], self.t_embedder[2], self.t_block[1]):
            nn.init.normal_(linear.weight, std=0.02)
        if self.y_embedder is not None:
            std = self._config["caption_init_std"]
            nn.init.normal_(self.y_embedder.fc1.weight, std=std)
            nn.init.normal_(self.y_embedder.fc2.weight, std=std)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.g_embedder is not None:
            init_guidance_embedder(self.g_embedder)
        if self.text_refiner is not None:
            self.text_refiner.reset_parameters()

    def pos_embed(self, grid_h: int, grid_w: int, device: torch.device) -> Tensor:
        """Cached fp32 sin-cos positions [1, h*w, D] for a token grid (diffusers PatchEmbed)."""
        key = (grid_h, grid_w, str(device))
        if key not in self._pos_cache:
            with torch.inference_mode(False):  # a normal tensor, reusable outside inference mode
                pos = sincos_pos_embed_2d(
                    self.hidden_size,
                    (grid_h, grid_w),
                    self.base_size,
                    self.interpolation_scale,
                    device,
                )
            self._pos_cache[key] = pos[None]  # [h*w, D] -> [1, h*w, D]
        return self._pos_cache[key]

    def embed_timestep(self, t: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """Timesteps [B] (or scalar) -> embedding [B, D] (PixArt-α adaLN-single input)."""
        t = t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)  # [B]
        return self.t_embedder(timestep_embedding(t).to(dtype))

    def add_guidance_embedding(self) -> None:
        """Turn on guidance_embed in place (zero-initialised: the output does not change), e.g. on
        a student copied from a teacher without it."""
        if self.g_embedder is not None:
            return
        ref = self.t_block[1].weight
        self.g_embedder = guidance_embedder(self.hidden_size).to(ref.device, ref.dtype)
        init_guidance_embedder(self.g_embedder)
        self._config["guidance_embed"] = True

    def embed_guidance(self, scale: Tensor | None, batch: int, dtype: torch.dtype) -> Tensor:
        """CFG scale s [B] (or scalar) -> [B, D]: sinusoidal features of 1000 (s - 1) through a
        zero-initialised MLP (LCM's w-conditioning, Luo et al. 2023 §4.2, w = s - 1)."""
        if self.g_embedder is None:
            raise ValueError("DiT: got guidance= but was built with guidance_embed=False.")
        if scale is None:
            raise ValueError("DiT with guidance_embed=True needs guidance= (the CFG scale).")
        scale = torch.as_tensor(scale, device=self.t_block[1].weight.device).float()
        scale = scale.reshape(-1).expand(batch) if scale.numel() == 1 else scale.reshape(batch)
        return self.g_embedder(timestep_embedding(1000.0 * (scale - 1.0)).to(dtype))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Latents [B,C,H,W], t [B], text [B,L,Ct], mask [B,L] (True=valid), cond [B,D],
        guidance [B] (CFG scale s, only with guidance_embed)."""
        b, _, h, w = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"DiT: latent size {h}x{w} is not divisible by patch_size={p}.")
        gh, gw = h // p, w // p
        x = self.x_embedder(x).flatten(2).transpose(1, 2)  # [B, D, gh, gw] -> [B, N, D]
        x = (x + self.pos_embed(gh, gw, x.device)).to(x.dtype)
        emb = self.embed_timestep(t, b, x.dtype)  # [B, D]
        if cond is not None:
            emb = emb + cond
        if guidance is not None or self.g_embedder is not None:
            emb = emb + self.embed_guidance(guidance, b, x.dtype)
        t6 = self.t_block(emb)  # [B, 6D] shared by all blocks (adaLN-single)
        bias = text_attention_bias(text_mask, x.dtype)
        if self.text_refiner is not None:
            text = self.text_refiner(text, bias)  # [B, L, Ct]
        context = self.y_embedder(text) if self.y_embedder is not None else text  # [B, L, Dc]
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, context, t6, bias, use_reentrant=False)
            else:
                x = block(x, context, t6, bias)
        x = self.final_layer(x, emb)  # [B, N, p*p*C_out]
        return self.unpatchify(x, gh, gw)

    def unpatchify(self, x: Tensor, grid_h: int, grid_w: int) -> Tensor:
        """Patch tokens [B, h*w, p*p*C] -> image [B, C, h*p, w*p] (diffusers' channel order)."""
        p, c = self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], grid_h, grid_w, p, p, c)  # [B, h, w, p, p, C]
        x = torch.einsum("nhwpqc->nchpwq", x)  # [B, C, h, p, w, p]
        return x.reshape(x.shape[0], c, grid_h * p, grid_w * p)  # [B, C, H, W]

    def flops_per_sample(self, latent_hw: tuple[int, int], text_len: int) -> float:
        """Forward FLOPs (2 x MACs of every matmul, conv and attention product) for one sample."""
        p, d = self.patch_size, self.hidden_size
        n = (latent_hw[0] // p) * (latent_hw[1] // p)
        length, ct = text_len, self._config["caption_channels"]
        macs = n * self.in_channels * p * p * d  # patch embedding
        macs += TIMESTEP_FREQ_DIM * d + d * d + d * 6 * d  # timestep MLP + adaLN-single
        if self.y_embedder is not None:
            macs += length * (ct * d + d * d)  # caption projection
        block = n * d * 3 * d + 2 * n * n * d + n * d * d  # self-attention
        block += n * d * d + length * self.context_dim * 2 * d + 2 * n * length * d + n * d * d
        block += 2 * n * d * self.mlp_hidden  # MLP
        macs += len(self.blocks) * block
        if self.text_refiner is not None:  # in/out projections; qkv, attention, proj, 4x MLP
            dr = self.text_refiner.config["dim"]
            block = length * dr * 3 * dr + 2 * length * length * dr + length * dr * dr
            macs += len(self.text_refiner.blocks) * (block + 8 * length * dr * dr)
            macs += 2 * length * ct * dr
        macs += n * d * p * p * self.out_channels  # final layer
        return 2.0 * macs
