"""HPSv2 / HPSv2.1 (Wu et al. 2023, Human Preference Score v2): open_clip ViT-H-14 fine-tuned on
human preferences; the score of an image is the cosine of its image and prompt embeddings, as
the ``hpsv2`` package computes it (``diag(image_features @ text_features.T)``). Needs the
optional extra ``fewstep[hps]`` (open_clip_torch); weights come from a local file only."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from fewstep.eval.metrics.features import resize_center_crop, to_unit
from fewstep.eval.metrics.weights import MissingWeightsError

CHECKPOINTS = ("HPS_v2.1_compressed.pt", "HPS_v2_compressed.pt")  # as xswu/HPSv2 names them
ARCH_CONFIG = "open_clip_config.json"  # optional: another architecture than ViT-H-14


def import_open_clip() -> Any:
    """The open_clip module, or one clear error naming the extra to install."""
    try:
        import open_clip
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "HPSv2 needs open_clip_torch: pip install 'fewstep[hps]'"
        ) from err
    return open_clip


def find_checkpoint(path: str | None) -> Path:
    """The HPS checkpoint: ``path`` itself, or the first of CHECKPOINTS in folder ``path``."""
    given = Path(path).expanduser() if path is not None else None
    if given is not None and given.is_file():
        return given
    for name in CHECKPOINTS if given is not None and given.is_dir() else ():
        if (given / name).is_file():
            return given / name
    raise MissingWeightsError(
        f"HPSv2: no checkpoint at {path}; expected a file or a folder holding one of "
        f"{list(CHECKPOINTS)} (layout: docs/metrics.md; nothing is downloaded)"
    )


class HPSv2(Metric):
    """Mean HPSv2 score of images in [-1, 1] against their prompts; ``path`` is the checkpoint
    file or its folder (an ``open_clip_config.json`` beside it overrides ``model_name``)."""

    inputs = ("prompts",)
    full_state_update = False

    def __init__(self, path: str, model_name: str = "ViT-H-14", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        open_clip = import_open_clip()
        checkpoint = find_checkpoint(path)
        if (checkpoint.parent / ARCH_CONFIG).is_file():
            model_name = f"local-dir:{checkpoint.parent}"
        self.model = open_clip.create_model(model_name, load_weights=False, output_dict=True)
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state.get("state_dict", state))
        self.model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = self.model.visual.preprocess_cfg
        size = self.model.visual.image_size
        self.size = size if isinstance(size, int) else int(size[0])
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.add_state(
            "score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def scores(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Per-image HPS [B]: cos(image embedding, prompt embedding)."""
        pixels = resize_center_crop(to_unit(images), self.size, (self.size, self.size))
        pixels = (pixels.clamp(0, 1) - self.mean) / self.std  # open_clip's val transform
        text = self.tokenizer(list(prompts)).to(images.device)
        out = self.model(pixels, text)  # features L2-normalised by open_clip
        return (out["image_features"] * out["text_features"]).sum(-1)

    def update(self, images: Tensor, prompts: list[str]) -> None:
        """Accumulate the scores of a batch."""
        with torch.no_grad():
            scores = self.scores(images, prompts)
        self.score_sum += scores.double().sum()
        self.count += len(scores)

    def compute(self) -> Tensor:
        """Mean HPS over all images (all ranks)."""
        return (self.score_sum / self.count.clamp(min=1)).float()
