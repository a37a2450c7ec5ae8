"""Pipelines for a DiT with a text refiner: a stock ``PixArtTransformer2DModel`` (``transformer/``)
on prompt embeddings refined by the DiT's ``TextRefiner`` (``text_refiner/``, a
``PixArtTextRefinerModel``), conditional and unconditional each with its own attention mask,
exactly as fewstep's DiT refines its text tokens before the caption projection.

Use (after ``pip install fewstep``, which registers nothing global)::

    from fewstep.export.refined_pixart import RefinedPixArtSigmaPipeline
    pipe = RefinedPixArtSigmaPipeline.from_pretrained(folder)
    images = pipe(prompt, num_inference_steps=20, guidance_scale=3.0).images
"""

from __future__ import annotations

from typing import Any

from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel
from torch import Tensor

from fewstep.export.guided_pixart import GuidedPixArtSigmaPipeline
from fewstep.models.text_refiner_diffusers import PixArtTextRefinerModel


def refine(refiner: PixArtTextRefinerModel, embeds: Tensor | None, mask: Tensor | None) -> Any:
    """Prompt embeddings [B, L, C] refined under their mask [B, L] (None passes through)."""
    if embeds is None:
        return None
    return refiner(embeds, mask).to(embeds.dtype)


class RefinedPixArtSigmaPipeline(PixArtSigmaPipeline):
    """PixArtSigmaPipeline whose prompt embeddings (given or encoded, and the negative ones for
    CFG) pass through ``text_refiner`` before the transformer."""

    model_cpu_offload_seq = "text_encoder->text_refiner->transformer->vae"

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        vae: Any,
        transformer: PixArtTransformer2DModel,
        scheduler: Any,
        text_refiner: PixArtTextRefinerModel,
    ) -> None:
        super().__init__(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=scheduler,
        )
        self.register_modules(text_refiner=text_refiner)

    def encode_prompt(self, *args: Any, **kwargs: Any) -> tuple[Any, Any, Any, Any]:
        """PixArtSigmaPipeline.encode_prompt, then the refiner on both embeddings."""
        embeds, mask, negative, negative_mask = super().encode_prompt(*args, **kwargs)
        embeds = refine(self.text_refiner, embeds, mask)
        return embeds, mask, refine(self.text_refiner, negative, negative_mask), negative_mask


class RefinedGuidedPixArtSigmaPipeline(RefinedPixArtSigmaPipeline, GuidedPixArtSigmaPipeline):
    """A guidance-embedded transformer (GuidedPixArtSigmaPipeline: ``guidance_scale`` feeds its
    scale embedding, one pass per step) on refined prompt embeddings."""
