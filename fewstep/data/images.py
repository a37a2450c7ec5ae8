"""Pixel-space data for the VAE stage: any dataset of image–caption dicts in a
LightningDataModule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep captions and metadata as lists."""
    return {
        "image": torch.stack([s["image"] for s in samples]),  # B,3,H,W
        "caption": [s["caption"] for s in samples],
        "metadata": [s.get("metadata", {}) for s in samples],
        "index": torch.tensor([s.get("index", -1) for s in samples]),
    }


class ImageDataModule(L.LightningDataModule):
    """Train/val image–caption datasets (e.g. ShapesWorld, ImageCaptionFolder)."""

    def __init__(
        self,
        train: Dataset,
        val: Dataset | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.num_workers, self.shuffle = batch_size, num_workers, shuffle

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, self.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, False) if self.val is not None else []
