"""``last.ckpt`` at the step training ended on, whatever ``every_n_train_steps`` is."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint


def stale_last_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
    """The ``save_last`` checkpoint callbacks whose last save is behind the trainer's step:
    Lightning saves ``last`` only with a step-triggered save, so with every_n_train_steps=500
    and max_steps=1100 its ``last.ckpt`` holds step 1000."""
    return [
        callback
        for callback in trainer.checkpoint_callbacks
        if isinstance(callback, ModelCheckpoint)
        and callback.save_last
        and callback.dirpath is not None
        and callback._last_global_step_saved != trainer.global_step
    ]


def save_final_last_checkpoints(trainer: pl.Trainer) -> list[str]:
    """When training ends, rewrite each stale ``last.ckpt`` at the final step (EMA and the
    other callbacks' state included); returns the paths written."""
    if trainer.global_step == 0 or trainer.sanity_checking:
        return []
    written = []
    for callback in stale_last_checkpoints(trainer):
        metrics = callback._monitor_candidates(trainer)  # epoch/step for templated names
        path = Path(callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST))
        if path.is_symlink():  # save_last="link": replace the link, not the file it names
            path.unlink()
        trainer.save_checkpoint(path)
        callback.last_model_path = str(path)
        written.append(str(path))
    return written


class FinalLastCheckpoint(Callback):
    """Add to any Trainer with a ``ModelCheckpoint(save_last=True)``: when training ends (at
    max_steps, or stopped by GracefulStop), ``last.ckpt`` holds that step. ``fewstep fit``
    adds it."""

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rewrite a stale ``last.ckpt`` at the final step."""
        save_final_last_checkpoints(trainer)
