"""FLUX.1 MMDiT (Black Forest Labs 2024, github.com/black-forest-labs/flux, src/flux/model.py;
MMDiT of SD3, Esser et al. 2024, arXiv:2403.03206) behind fewstep's network interface.

Double-stream blocks, then single-stream blocks; 3-axis RoPE over text and image ids; 2x2 packing
of the latents; timestep, guidance (FLUX.1-dev is guidance-distilled: the scale is an input, not a
second pass) and the pooled CLIP vector summed into the modulation vector; T5 tokens as the text
stream. State-dict keys are the reference's; the outputs equal diffusers' ``FluxTransformer2DModel``
(converters in ``fewstep.models.flux_convert``, local folders in ``fewstep.models.flux_io``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fewstep.models.dit import TIMESTEP_FREQ_DIM, timestep_embedding
from fewstep.models.flux_layers import (
    PACK,
    DoubleStreamBlock,
    LastLayer,
    MLPEmbedder,
    Rope,
    SingleStreamBlock,
    joint_mask,
    pack_latents,
    position_ids,
    rope_angles,
    unpack_latents,
    zero_output_embedder,
)
from fewstep.models.token_features import TokenFeatures

__all__ = ["Flux", "pack_latents", "position_ids", "unpack_latents"]


class Flux(nn.Module):
    """FLUX.1 transformer: latents [B,C,H,W], model time t [B] (1000 sigma), T5 text [B,L,Dt],
    pooled CLIP vector ``cond`` [B,Dv], guidance scale [B] -> velocity [B,C,H,W].

    Defaults are FLUX.1-dev's (12B, guidance-distilled); FLUX.1-schnell has guidance_embed=False.
    ``in_channels`` counts latent channels (16 for the FLUX.1 VAE); tokens carry 4x that.
    """

    def __init__(
        self,
        in_channels: int = 16,
        hidden_size: int = 3072,
        num_heads: int = 24,
        depth: int = 19,
        depth_single_blocks: int = 38,
        context_in_dim: int = 4096,
        vec_in_dim: int = 768,
        axes_dim: tuple[int, int, int] = (16, 56, 56),
        guidance_embed: bool = True,
        gradient_checkpointing: bool = False,
        text_positions: bool = False,
    ) -> None:
        """``context_in_dim``: T5 width; ``vec_in_dim``: pooled CLIP width; ``axes_dim``: RoPE
        channels of the (index, row, column) axes, summing to the head width;
        ``text_positions``: text token k at RoPE index k instead of 0 (see ``position_ids``; not
        FLUX.1's, so such a network does not export to a diffusers FluxPipeline)."""
        super().__init__()
        _check_widths(hidden_size, num_heads, tuple(axes_dim))
        self._config = dict(
            in_channels=in_channels,
            hidden_size=hidden_size,
            num_heads=num_heads,
            depth=depth,
            depth_single_blocks=depth_single_blocks,
            context_in_dim=context_in_dim,
            vec_in_dim=vec_in_dim,
            axes_dim=tuple(axes_dim),
            guidance_embed=guidance_embed,
            gradient_checkpointing=gradient_checkpointing,
            text_positions=text_positions,
        )
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.axes_dim = tuple(axes_dim)
        self.learn_sigma = False  # a velocity only (the Denoiser reads this)
        self.gradient_checkpointing = gradient_checkpointing
        token_dim = in_channels * PACK * PACK
        self.img_in = nn.Linear(token_dim, hidden_size)
        self.time_in = MLPEmbedder(TIMESTEP_FREQ_DIM, hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(TIMESTEP_FREQ_DIM, hidden_size) if guidance_embed else None
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, num_heads) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, num_heads) for _ in range(depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden_size, token_dim)
        self._rope_cache: dict[tuple[int, int, int, str], tuple[Tensor, Tensor]] = {}

    @property
    def out_channels(self) -> int:
        """Output channels: the velocity has the latents' channels."""
        return self.in_channels

    def config(self) -> dict:
        """The init arguments (for fingerprints and export)."""
        return dict(self._config)

    def token_features(self) -> TokenFeatures:
        """The double then single blocks with their image tokens on the 2x2-packed latent grid
        (features of LADD's and DMD2's discriminator heads): a double block's image stream, the
        image part (after the text) of a single block's joint sequence."""
        blocks = [*self.double_blocks, *self.single_blocks]
        text_dim = self._config["context_in_dim"]
        return TokenFeatures(blocks, self.hidden_size, text_dim, PACK, image_tokens)

    def add_guidance_embedding(self) -> None:
        """Turn on guidance_embed in place with a zero output layer (the output does not change
        until it is trained), e.g. on a FLUX.1-schnell-like student."""
        if self.guidance_in is None:
            self.guidance_in = zero_output_embedder(self.hidden_size, self.img_in.weight)
            self._config["guidance_embed"] = True

    def rope(self, text_len: int, grid_h: int, grid_w: int, device: torch.device) -> Rope:
        """Cached fp32 (cos, sin) [L + h*w, head_dim/2] of the position ids (FLUX.1 EmbedND)."""
        key = (text_len, grid_h, grid_w, str(device))
        if key not in self._rope_cache:
            with torch.inference_mode(False):  # normal tensors, reusable outside inference mode
                ids = position_ids(text_len, grid_h, grid_w, device, self._config["text_positions"])
                angles = rope_angles(ids, self.axes_dim)
                self._rope_cache[key] = (angles.cos().float(), angles.sin().float())
        return self._rope_cache[key]

    def vector(
        self,
        t: Tensor,
        cond: Tensor | None,
        guidance: Tensor | None,
        batch: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """Modulation vector [B, D] = time_in(t) + guidance_in(1000 s) + vector_in(pooled)
        (FLUX.1 Flux.forward; diffusers CombinedTimestepGuidanceTextProjEmbeddings)."""
        if cond is None:
            raise ValueError(
                "Flux needs cond= (the pooled CLIP text vector [B, vec_in_dim]); a cache built "
                "from a FLUX.1 folder stores it next to the T5 tokens."
            )
        vec = self.time_in(timestep_embedding(_per_sample(t, batch)).to(dtype))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "Flux with guidance_embed=True needs guidance= (the guidance scale, e.g. 3.5 "
                    "for FLUX.1-dev); build it with guidance_embed=False for FLUX.1-schnell."
                )
            scale = _per_sample(torch.as_tensor(guidance, device=t.device), batch)
            vec = vec + self.guidance_in(timestep_embedding(1000.0 * scale.float()).to(dtype))
        elif guidance is not None:
            raise ValueError("Flux: got guidance= but was built with guidance_embed=False.")
        return vec + self.vector_in(cond.to(dtype))

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        cond: Tensor | None = None,
        guidance: Tensor | None = None,
    ) -> Tensor:
        """Latents [B,C,H,W], t [B] (model time 1000 sigma: FluxPipeline's timestep), T5 text
        [B,L,Dt], mask [B,L] (True = valid; None attends to every token, as FluxPipeline), pooled
        CLIP ``cond`` [B,Dv], ``guidance`` [B] (the scale s, embedded as 1000 s) -> [B,C,H,W]."""
        b, _, h, w = x.shape
        if h % PACK or w % PACK:
            raise ValueError(f"Flux: latent size {h}x{w} must be even (2x2 packing).")
        img = self.img_in(pack_latents(x).to(self.img_in.weight.dtype))  # [B, N, D]
        txt = self.txt_in(text.to(img.dtype))  # [B, L, D]
        vec = self.vector(t, cond, guidance, b, img.dtype)  # [B, D]
        rope = self.rope(txt.shape[1], h // PACK, w // PACK, x.device)
        mask = joint_mask(text_mask, img.shape[1])
        for block in self.double_blocks:
            img, txt = self._run(block, img, txt, vec, rope, mask)
        joint = torch.cat([txt, img], dim=1)  # [B, L + N, D]
        for block in self.single_blocks:
            joint = self._run(block, joint, vec, rope, mask)
        img = self.final_layer(joint[:, txt.shape[1] :], vec)  # [B, N, 4C]
        return unpack_latents(img, h, w)

    def _run(self, block: nn.Module, *args: Any) -> Any:
        """A block, under activation checkpointing when enabled and training."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)


def image_tokens(output: Tensor | tuple[Tensor, Tensor], num_image: int) -> Tensor:
    """A Flux block's output -> its image tokens [B, N, D]: the image stream of a double block's
    (image, text), the last N tokens of a single block's joint [text; image] sequence."""
    if isinstance(output, tuple):
        return output[0]  # (img [B, N, D], txt [B, L, D])
    return output[:, -num_image:]  # [B, L + N, D] -> [B, N, D]


def _per_sample(value: Tensor, batch: int) -> Tensor:
    """A scalar or [B] tensor as [B]."""
    return value.reshape(-1).expand(batch) if value.numel() == 1 else value.reshape(batch)


def _check_widths(hidden: int, heads: int, axes_dim: tuple[int, ...]) -> None:
    """Heads divide the width; the RoPE axes (even) fill the head width."""
    if hidden % heads:
        raise ValueError(f"Flux: hidden_size={hidden} must be divisible by num_heads={heads}.")
    if len(axes_dim) != 3 or any(d % 2 for d in axes_dim) or sum(axes_dim) != hidden // heads:
        raise ValueError(
            f"Flux: axes_dim={list(axes_dim)} must be 3 even numbers summing to the head width "
            f"hidden_size / num_heads = {hidden // heads}."
        )
