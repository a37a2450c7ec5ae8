"""A frozen, pluggable feature-space perceptual distance: LPIPS (Zhang et al. 2018, eq. 1)
with unit linear weights, over any timm backbone; weights only from a local file."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def _timm() -> Any:
    """timm, which the perceptual loss needs (the optional extra ``fewstep[perceptual]``)."""
    try:
        import timm
    except ImportError:
        raise ModuleNotFoundError(
            "FeaturePerceptualLoss needs timm: pip install 'fewstep[perceptual]' (or timm)."
        ) from None
    return timm


class FeaturePerceptualLoss(nn.Module):
    """Mean over layers of the spatially averaged squared L2 distance between channel-normalised
    features of a frozen timm network (LPIPS, Zhang et al. 2018, eq. 1, without learned heads)."""

    def __init__(
        self,
        model_name: str = "resnet18",
        weights_path: str | None = None,
        out_indices: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        self.net = self._build(model_name, weights_path, out_indices)
        self.net.requires_grad_(False).eval()
        cfg = self.net.pretrained_cfg
        mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, -1, 1, 1), persistent=False)

    @staticmethod
    def _build(
        name: str, weights_path: str | None, out_indices: tuple[int, ...] | None
    ) -> nn.Module:
        """A features_only timm model; weights from ``weights_path`` (never downloaded)."""
        timm = _timm()
        kwargs = {"features_only": True}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        if weights_path is None:
            warnings.warn(
                f"FeaturePerceptualLoss: no weights_path for '{name}'; using RANDOM features. "
                "Give a local weights file (.safetensors/.pth) for a meaningful perceptual loss.",
                stacklevel=3,
            )
            return timm.create_model(name, pretrained=False, **kwargs)
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"FeaturePerceptualLoss weights_path '{path}' does not exist: give a local "
                f"state-dict file for timm model '{name}' (weights are never downloaded)."
            )
        # timm loads `file` before wrapping in the feature extractor, so classifier-head keys
        # and timm's own key remapping are handled; source "timm" keeps it off the hub.
        overlay = {"file": str(path), "source": "timm"}
        try:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs
            )
        except (RuntimeError, KeyError, ValueError) as err:
            raise ValueError(
                f"FeaturePerceptualLoss: weights '{path}' do not fit timm model '{name}': {err}"
            ) from None

    def train(self, mode: bool = True) -> FeaturePerceptualLoss:
        """Keep the frozen feature network in eval mode whatever the parent's mode."""
        super().train(mode)
        self.net.eval()
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        """Images in [-1,1] -> channel-normalised feature maps, one per layer."""
        x = ((images + 1.0) / 2.0 - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        feats = self.net(x)
        return [f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10) for f in feats]

    def forward(self, images: Tensor, target: Tensor) -> Tensor:
        """Scalar distance between two image batches [B,3,H,W] in [-1,1] (differentiable)."""
        per_layer = [
            (a - b).pow(2).sum(dim=1).mean(dim=(1, 2))  # [B]
            for a, b in zip(self.features(images), self.features(target), strict=True)
        ]
        return torch.stack(per_layer).mean()
