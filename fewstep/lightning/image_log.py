"""Validation images for any logger: always a PNG under the run's log folder (the file the demo
report reads), plus TensorBoard's ``add_image`` or a logger's own ``log_image`` (W&B) when the
trainer has one."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image


def log_dir(trainer: pl.Trainer) -> Path:
    """Where this run writes its files (the logger's folder, else the root dir)."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def log_image(trainer: pl.Trainer, tag: str, image: Image.Image, png: Path | None) -> None:
    """Save ``image`` at ``png`` (if given) and send it to every logger that takes images."""
    if png is not None:
        png.parent.mkdir(parents=True, exist_ok=True)
        image.save(png)
    pixels, step = np.asarray(image.convert("RGB")), trainer.global_step
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(tag, pixels, step, dataformats="HWC")
        elif hasattr(logger, "log_image"):  # e.g. WandbLogger
            logger.log_image(key=tag, images=[pixels], step=step)
