"""Pixel-space data for the VAE stage: any dataset of image–caption dicts in a
LightningDataModule."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from fewstep.data.image_folder import split_skipped
from fewstep.data.resumable import resumable_sampler


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep captions and metadata as lists. Unreadable images (see
    ImageCaptionFolder) are dropped from the batch, never replaced."""
    samples, skipped = split_skipped(samples)
    if not samples:
        raise ValueError(
            f"every image of a batch was unreadable ({'; '.join(skipped)}); run "
            "ImageCaptionFolder.check() to drop bad files before training"
        )
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

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        sampler = None
        if train:  # exact mid-epoch resume (ResumableSampler), shuffled by (seed, epoch)
            sampler = resumable_sampler(
                dataset, self.batch_size, self.trainer, shuffle=self.shuffle
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_samples,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train, train=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val, train=False) if self.val is not None else []
