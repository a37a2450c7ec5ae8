"""The DiT's text refiner as a diffusers model component (``text_refiner/`` of an exported
pipeline: config.json + safetensors): the same ``TextRefiner`` applied to prompt embeddings
[B, L, C] with the pipeline's attention mask, so that a DiT with a refiner is a stock
``PixArtTransformer2DModel`` on refined prompt embeddings (fewstep.export.refined_pixart)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import Tensor

from fewstep.models.dit import text_attention_bias
from fewstep.models.text_refiner import TextRefiner

# DiffusionPipeline.from_pretrained finds a custom component's loading methods by looking up its
# base classes (ModelMixin, ...) in the component's own module, so this module must name them.
__all__ = ["ConfigMixin", "ModelMixin", "PixArtTextRefinerModel"]


class PixArtTextRefinerModel(ModelMixin, ConfigMixin):
    """``TextRefiner`` (x + out(blocks(in(x) + positions))) as a diffusers model; its weights are
    the DiT's ``text_refiner.*`` under ``refiner.*``."""

    @register_to_config
    def __init__(
        self,
        channels: int,
        dim: int,
        num_heads: int,
        depth: int,
        max_tokens: int,
        alibi: bool = False,
        relative: bool = False,
        conv: int = 0,
    ) -> None:
        super().__init__()
        self.refiner = TextRefiner(
            channels, dim, num_heads, depth, max_tokens, alibi=alibi, relative=relative, conv=conv
        )

    def forward(self, prompt_embeds: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Refine prompt embeddings [B, L, C] (mask [B, L], 1 = token, 0 = padding). Only the
        columns up to the last token of any row are refined: the padding after them is masked
        out of every attention, so their absence changes no token's output, and a pipeline's
        padding to max_sequence_length need not fit ``max_tokens``; padding passes unchanged."""
        if attention_mask is None:
            return self._refine(prompt_embeds, None)
        valid = attention_mask.to(prompt_embeds.device).bool()  # [B, L]
        columns = valid.any(dim=0).nonzero()
        length = int(columns.max()) + 1 if columns.numel() else 1
        head = self._refine(prompt_embeds[:, :length], valid[:, :length])
        return torch.cat([head, prompt_embeds[:, length:]], dim=1)  # [B, L, C]

    def _refine(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """The refiner on tokens [B, l, C] with key-padding mask [B, l] (True = token)."""
        limit = self.config.max_tokens
        if tokens.shape[1] > limit:
            raise ValueError(
                f"PixArtTextRefinerModel: prompts of {tokens.shape[1]} tokens exceed its "
                f"max_tokens={limit} (the DiT's text_refiner_max_tokens); shorten the prompts or "
                "lower the pipeline's max_sequence_length."
            )
        return self.refiner(tokens, text_attention_bias(valid, tokens.dtype))
