"""Guidance-embedded students in diffusers: a ``PixArtTransformer2DModel`` with the student's
CFG-scale embedding (Meng et al. 2023 §3.1; LCM §4.2) added to its timestep embedding exactly as
fewstep's DiT adds it, and a ``PixArtSigmaPipeline`` whose ``guidance_scale`` feeds that embedding
(one network pass per step) instead of running two-pass classifier-free guidance.

Use (after ``pip install fewstep``, which registers nothing global)::

    from fewstep.export.guided_pixart import GuidedPixArtSigmaPipeline
    pipe = GuidedPixArtSigmaPipeline.from_pretrained(folder)
    images = pipe(prompt, num_inference_steps=4, guidance_scale=3.0).images
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from diffusers import ModelMixin, PixArtSigmaPipeline, PixArtTransformer2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import Tensor, nn

GUIDANCE_FREQ_DIM = 256  # sinusoidal features of the scale, as of the timestep (PixArt-α)
GUIDANCE_TIME_SCALE = 1000.0  # the embedding sees 1000 (s - 1), as fewstep's DiT.embed_guidance
PIXART_DEFAULT_GUIDANCE = 4.5  # PixArtSigmaPipeline's default guidance_scale
# DiffusionPipeline.from_pretrained finds a custom component's loading methods by looking up its
# base classes (ModelMixin, ...) in the component's own module, so this module must name them.
__all__ = ["GuidedPixArtSigmaPipeline", "GuidedPixArtTransformer2DModel", "ModelMixin"]


class GuidedPixArtTransformer2DModel(PixArtTransformer2DModel):
    """PixArt-Σ transformer plus a CFG-scale embedding g(s) = MLP(sinusoid(1000 (s - 1))) added
    to the timestep embedding before adaLN-single (fewstep.models.dit.DiT.embed_guidance). The
    scale comes from ``forward(..., guidance=s)`` or, for pipeline calls, ``self.guidance_scale``.
    """

    @functools.wraps(PixArtTransformer2DModel.__init__)  # same config signature for from_config
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        dim = self.config.num_attention_heads * self.config.attention_head_dim
        self.guidance_proj = Timesteps(
            GUIDANCE_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        )
        self.guidance_embedder = TimestepEmbedding(GUIDANCE_FREQ_DIM, dim)
        self.guidance_scale: float | Tensor | None = None  # set per call by the pipeline
        self._call_guidance: float | Tensor | None = None
        self.adaln_single.emb.register_forward_hook(self._add_guidance)

    def embed_guidance(self, scale: float | Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """CFG scale s (scalar or [B]) -> the [B, D] embedding added to the timestep's."""
        device = self.guidance_embedder.linear_1.weight.device
        s = torch.as_tensor(scale, device=device, dtype=torch.float32).reshape(-1)
        s = s.expand(batch) if s.numel() == 1 else s
        features = self.guidance_proj(GUIDANCE_TIME_SCALE * (s - 1.0))
        return self.guidance_embedder(features.to(dtype))

    def _add_guidance(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        """Forward hook on adaln_single.emb: timestep embedding + guidance embedding."""
        scale = self._call_guidance
        if scale is None:
            raise ValueError(
                "GuidedPixArtTransformer2DModel needs the CFG scale: call it with guidance=s or "
                "through GuidedPixArtSigmaPipeline(..., guidance_scale=s)."
            )
        return output + self.embed_guidance(scale, output.shape[0], output.dtype)

    def forward(self, *args: Any, guidance: float | Tensor | None = None, **kwargs: Any) -> Any:
        """PixArtTransformer2DModel.forward at CFG scale ``guidance`` (else guidance_scale)."""
        self._call_guidance = guidance if guidance is not None else self.guidance_scale
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._call_guidance = None


class GuidedPixArtSigmaPipeline(PixArtSigmaPipeline):
    """PixArtSigmaPipeline for a guidance-embedded transformer: ``guidance_scale`` is the input
    of the scale embedding (one pass per step, no unconditional batch), not two-pass CFG."""

    def __call__(self, *args: Any, guidance_scale: float = PIXART_DEFAULT_GUIDANCE, **kwargs: Any):
        """Sample at embedded CFG scale ``guidance_scale``; other arguments as the parent's."""
        if not isinstance(self.transformer, GuidedPixArtTransformer2DModel):
            raise TypeError(
                f"GuidedPixArtSigmaPipeline needs a GuidedPixArtTransformer2DModel, got "
                f"{type(self.transformer).__name__}; use PixArtSigmaPipeline for plain PixArt."
            )
        self.transformer.guidance_scale = float(guidance_scale)
        try:
            return super().__call__(*args, guidance_scale=1.0, **kwargs)
        finally:
            self.transformer.guidance_scale = None
