"""CLIPScore (Hessel et al. 2021): 100 * max(cos(image, caption), 0), averaged, computed by
torchmetrics' CLIPScore with the model and processor of a local HF CLIP folder."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torchmetrics.multimodal.clip_score import CLIPScore as TorchmetricsCLIPScore

from fewstep.eval.metrics.features import to_uint8
from fewstep.eval.metrics.weights import HF_PREPROCESSOR, HF_WEIGHTS, require_files

CLIP_FILES = (
    "config.json",
    HF_WEIGHTS,
    HF_PREPROCESSOR,
    "tokenizer_config.json",
    ("tokenizer.json", "vocab.json"),
)


class ClipEmbeddings(nn.Module):
    """A CLIPModel whose ``get_image_features`` / ``get_text_features`` return the projected
    embeddings as tensors (transformers 5 returns output objects, which torchmetrics 1.9's
    CLIPScore cannot normalise)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        """Projected image embeddings [B, D]."""
        return _tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Projected text embeddings [B, D]."""
        out = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return _tensor(out)


def _tensor(out: Any) -> Tensor:
    """Embeddings from get_*_features: a tensor, or an output's ``pooler_output``."""
    return out if isinstance(out, Tensor) else out.pooler_output


def load_clip(path: str, metric: str) -> tuple[ClipEmbeddings, Any]:
    """(CLIP embeddings, CLIPProcessor) of a local HF CLIP folder, or one clear error."""
    from transformers import CLIPModel, CLIPProcessor

    folder = require_files(path, CLIP_FILES, metric)
    model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False)
    return ClipEmbeddings(model).eval(), CLIPProcessor.from_pretrained(folder)


class CLIPScore(TorchmetricsCLIPScore):
    """torchmetrics CLIPScore from the HF CLIP folder ``path``; ``update(images, prompts)``
    with images in [-1, 1] (quantised to uint8 as the processor expects)."""

    inputs = ("prompts",)
    full_state_update = False  # sums only: ranks merge by addition

    def __init__(self, path: str, **kwargs: Any) -> None:
        model, processor = load_clip(path, "CLIPScore")
        super().__init__(model_name_or_path=lambda: (model, processor), **kwargs)

    def update(self, images: Tensor, prompts: list[str]) -> None:  # type: ignore[override]
        """Score a batch of images against their prompts."""
        super().update(list(to_uint8(images)), list(prompts))
