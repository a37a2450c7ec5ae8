"""The shapes feature network: a small CNN trained on shapes-world renders to count each shape
and each colour, whose pooled features serve Fréchet distances and diversity on the shapes
world the way LeNet features serve FID on MNIST. Shipped in ``fewstep/assets/shapes_features``."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fewstep.data.prompts import COLORS, SHAPES
from fewstep.utils.manifest import verify_shipped

MAX_COUNT = 4  # counts 0..4 per shape and per colour (the world draws at most 4 objects)
HEADS = (*SHAPES, *COLORS)  # one count classifier per shape and per colour
PACKAGED = Path(__file__).parents[1] / "assets" / "shapes_features"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class ShapesFeatureNet(nn.Module):
    """Images [B, 3, R, R] in [-1, 1] (resized to ``resolution``) -> features [B, width]; heads
    predict the count (0..4) of each shape and each colour."""

    def __init__(self, width: int = 128, resolution: int = 64) -> None:
        super().__init__()
        self.width, self.resolution = width, resolution
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1),  # R -> R/2
            nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),  # -> R/4
            nn.GELU(),
            nn.Conv2d(64, width, 3, stride=2, padding=1),  # -> R/8
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        self.heads = nn.Linear(width, len(HEADS) * (MAX_COUNT + 1))

    @property
    def num_features(self) -> int:
        """Feature width (torchmetrics reads it instead of probing with a dummy image)."""
        return self.width

    def features(self, images: Tensor) -> Tensor:
        """Pooled features [B, width] of images in [-1, 1]."""
        images = images.float()
        if images.shape[-1] != self.resolution or images.shape[-2] != self.resolution:
            size = (self.resolution, self.resolution)
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True)
        return self.body(images).mean(dim=(2, 3))  # [B, width, r, r] -> [B, width]

    def forward(self, images: Tensor) -> Tensor:
        """Features [B, width] (the torchmetrics feature-extractor interface)."""
        return self.features(images)

    def count_logits(self, images: Tensor) -> Tensor:
        """Count logits [B, heads, MAX_COUNT + 1] per shape and colour (training target)."""
        logits = self.heads(self.features(images))  # [B, heads * (MAX + 1)]
        return logits.reshape(len(images), len(HEADS), MAX_COUNT + 1)

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"width": self.width, "resolution": self.resolution, "heads": list(HEADS)}
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS)

    @classmethod
    def load(cls, folder: str | Path | None = None) -> ShapesFeatureNet:
        """The network in ``folder`` (default: the packaged one, sha256-checked), frozen."""
        folder = Path(folder) if folder is not None else PACKAGED
        if not (folder / WEIGHTS).is_file() or not (folder / CONFIG).is_file():
            raise FileNotFoundError(
                f"No shapes feature network in {folder} (needs {CONFIG} and {WEIGHTS}); train "
                "one with `fewstep shapes-features --out DIR`"
            )
        verify_shipped(folder)
        config = json.loads((folder / CONFIG).read_text())
        net = cls(width=config["width"], resolution=config["resolution"])
        net.load_state_dict(load_file(folder / WEIGHTS))
        return net.eval().requires_grad_(False)


def count_targets(objects: list[dict]) -> Tensor:
    """Counts [heads] of each shape and each colour among a render's placed objects."""
    counts = [sum(o["shape"] == s for o in objects) for s in SHAPES]
    counts += [sum(o["color"] == c for o in objects) for c in COLORS]
    return torch.tensor(counts).clamp(max=MAX_COUNT)
