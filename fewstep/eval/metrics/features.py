"""Feature networks for distribution metrics (FID, KID, CMMD), each loaded from a local path and
frozen: images [B, 3, H, W] in [-1, 1] -> features [B, D] (``num_features`` = D)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewstep.eval.metrics.weights import (
    HF_PREPROCESSOR,
    HF_WEIGHTS,
    MissingWeightsError,
    require_files,
)
from fewstep.models.shapes_features import ShapesFeatureNet

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # torch-fidelity's FID Inception weights


def to_unit(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> [0, 1] (float32)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255], as a saved PNG holds them."""
    return (to_unit(images) * 255).round().to(torch.uint8)


def resize_center_crop(images: Tensor, shortest_edge: int, crop: tuple[int, int]) -> Tensor:
    """Bicubic antialiased resize of the shorter side to ``shortest_edge``, then a centre crop
    to ``crop`` (H, W): the CLIP / DINOv2 image processors' geometry, on tensors."""
    h, w = images.shape[-2:]
    scale = shortest_edge / min(h, w)
    size = (max(round(h * scale), crop[0]), max(round(w * scale), crop[1]))
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bicubic", antialias=True)
    top, left = (size[0] - crop[0]) // 2, (size[1] - crop[1]) // 2
    return images[..., top : top + crop[0], left : left + crop[1]]  # [B, 3, cH, cW]


class FrozenFeatures(nn.Module):
    """A feature network that never trains (eval mode, no gradients)."""

    def train(self, mode: bool = True) -> FrozenFeatures:
        """Stay in eval mode whatever the caller asks (dropout/batch-norm fixed)."""
        return super().train(False)

    def freeze(self) -> None:
        """No gradients, eval mode."""
        self.requires_grad_(False)
        self.train(False)


class InceptionFeatures(FrozenFeatures):
    """The FID Inception-v3 (Heusel et al. 2017; TF graph 2015-12-05 as ported by torch-fidelity
    and used by torchmetrics): pool3 features [B, 2048] of images resized to 299 inside."""

    def __init__(self, path: str, feature: int = 2048) -> None:
        super().__init__()
        file = Path(path).expanduser() if path is not None else None
        if file is not None and file.is_dir():
            file = file / INCEPTION_FILE
        if file is None or not file.is_file():
            raise MissingWeightsError(
                f"InceptionFeatures: no weights file at {path}; expected {INCEPTION_FILE} (the "
                "FID Inception state dict torch-fidelity/torchmetrics use) or a folder holding "
                "it (layout: docs/metrics.md; nothing is downloaded)"
            )
        torch.load(file, map_location="cpu", weights_only=True)  # refuse pickled code up front
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3("inception-v3-compat", [str(feature)], str(file))
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity: pip install 'fewstep[fid]'"
            ) from err
        self.num_features = feature
        self.freeze()

    def forward(self, images: Tensor) -> Tensor:
        """Features [B, D] of images in [-1, 1] (quantised to uint8 as torchmetrics expects)."""
        return self.net(to_uint8(images)).reshape(len(images), -1)


def read_preprocessing(folder: Path) -> tuple[int, tuple[int, int], list[float], list[float]]:
    """(shortest edge, crop (H, W), mean, std) from an HF ``preprocessor_config.json`` (or the
    ``image_processor`` section of a ``processor_config.json``)."""
    file = next(folder / n for n in HF_PREPROCESSOR if (folder / n).is_file())
    config = json.loads(file.read_text())
    config = config.get("image_processor", config)
    size, crop = config.get("size", 224), config.get("crop_size", config.get("size", 224))
    if isinstance(size, dict):
        size = size.get("shortest_edge", size.get("height"))
    crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return int(size), crop_hw, list(config["image_mean"]), list(config["image_std"])


class ImageTower(FrozenFeatures):
    """The image tower of an HF CLIP folder (projected image embedding, as CLIP's ``image_embeds``;
    Radford et al. 2021) or a DINOv2 folder (the normalised CLS token, ``pooler_output``; Oquab
    et al. 2023), with the folder's own resize/crop/normalisation; ``normalize`` L2-normalises."""

    EXPECTED = ("config.json", HF_WEIGHTS, HF_PREPROCESSOR)

    def __init__(self, path: str, normalize: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, CLIPVisionModelWithProjection, Dinov2Model

        folder = require_files(path, self.EXPECTED, "ImageTower (CLIP or DINOv2 folder)")
        config = AutoConfig.from_pretrained(folder)
        kind = config.model_type
        if kind in ("clip", "clip_vision_model"):
            if kind == "clip":  # a full CLIP folder: its vision tower and image projection only
                config.vision_config.projection_dim = config.projection_dim
                config = config.vision_config
            self.net = CLIPVisionModelWithProjection.from_pretrained(folder, config=config)
            self.num_features = int(self.net.config.projection_dim)
        elif kind == "dinov2":
            self.net = Dinov2Model.from_pretrained(folder)
            self.num_features = int(self.net.config.hidden_size)
        else:
            raise ValueError(f"ImageTower: {folder} holds a {kind!r} model; use CLIP or DINOv2")
        self.kind, self.normalize = kind, normalize
        self.shortest_edge, self.crop, mean, std = read_preprocessing(folder)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.freeze()

    def pixels(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] -> the tower's normalised input [B, 3, cH, cW]."""
        unit = resize_center_crop(to_unit(images), self.shortest_edge, self.crop).clamp(0, 1)
        return (unit - self.mean) / self.std

    def forward(self, images: Tensor) -> Tensor:
        """Features [B, D] of images in [-1, 1]."""
        out = self.net(pixel_values=self.pixels(images).to(self.net.dtype))
        features = out.image_embeds if self.kind != "dinov2" else out.pooler_output
        features = features.float()
        return F.normalize(features, dim=-1) if self.normalize else features


class ShapesFeatures(FrozenFeatures):
    """The shapes feature network (``path``; None: the packaged one) as a feature module."""

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.net = ShapesFeatureNet.load(path)
        self.num_features = self.net.num_features
        self.freeze()

    def forward(self, images: Tensor) -> Tensor:
        """Features [B, width] of images in [-1, 1]."""
        return self.net(images)
