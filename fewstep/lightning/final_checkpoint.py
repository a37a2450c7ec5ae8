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
    other callbacks' state included) in the callback's own last file (``own_last_path``);
    returns the paths written."""
    if trainer.global_step == 0 or trainer.sanity_checking:
        return []
    written = []
    for callback in stale_last_checkpoints(trainer):
        path = Path(own_last_path(callback, trainer))
        if path.is_symlink():  # save_last="link": replace the link, not the file it names
            path.unlink()
        callback.last_model_path = str(path)  # before saving: the state records it (resume)
        trainer.save_checkpoint(path)
        callback._last_checkpoint_saved = str(path)  # (Lightning >= 2.6 re-saves at train end)
        if not _step_save_due(callback, trainer):  # else it saves this step itself, after us
            callback._last_global_step_saved = trainer.global_step  # no epoch-end re-save
        written.append(str(path))
    return written


def own_last_path(callback: ModelCheckpoint, trainer: pl.Trainer) -> str:
    """The file ``callback`` saves its ``last`` to, chosen as Lightning chooses it: its recorded
    last path, or ``last.ckpt`` unless another run's file is there (then ``last-v1.ckpt``, ...),
    so a new fit beside an old run's ``last.ckpt`` never overwrites it."""
    metrics = callback._monitor_candidates(trainer)  # epoch/step for templated names
    path = callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST)
    version = callback.STARTING_VERSION
    while (
        callback._enable_version_counter
        and callback.file_exists(path, trainer)
        and path != callback.last_model_path
    ):
        path = callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST, ver=version)
        version += 1
    return path


def adopt_resumed_last(trainer: pl.Trainer) -> list[str]:
    """A fit resumed from a ``save_last`` callback's own ``last.ckpt`` keeps saving there.

    Lightning versions a ``last`` save whose file exists but is not the callback's recorded
    last path: a run whose first stop came before its first periodic save (or whose
    checkpoint state names another file) then saves its periodic ``last`` as ``last-v1.ckpt``
    while a graceful stop rewrites ``last.ckpt``. After a crash, ``last.ckpt`` is the older of
    the two and a resume from it silently repeats the steps since. Only a fit resumed from that
    very file adopts it, so a new fit beside an old ``last.ckpt`` still leaves it alone."""
    resumed = trainer.ckpt_path
    if not resumed:
        return []
    adopted = []
    for callback in trainer.checkpoint_callbacks:
        if not (isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath):
            continue
        last = Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        if last.exists() and last.resolve() == Path(resumed).resolve():
            callback.last_model_path = str(last)
            adopted.append(str(last))
    return adopted


def _step_save_due(callback: ModelCheckpoint, trainer: pl.Trainer) -> bool:
    """Whether ``callback`` saves a step checkpoint at this step in its own batch-end hook."""
    every = callback._every_n_train_steps
    return every >= 1 and trainer.global_step % every == 0


def ends_training(trainer: pl.Trainer) -> bool:
    """Whether the batch that just finished is the fit's last: max_steps reached, or a stop
    requested (GracefulStop, NonFiniteGuard)."""
    max_steps = trainer.max_steps
    return bool(trainer.should_stop) or (
        max_steps is not None and 0 <= max_steps <= trainer.global_step
    )


class FinalLastCheckpoint(Callback):
    """Add to any Trainer with a ``ModelCheckpoint(save_last=True)``: when training ends (at
    max_steps, or stopped by GracefulStop), ``last.ckpt`` holds that step. ``fewstep fit``
    adds it.

    It writes at the end of the final *batch*, where ModelCheckpoint's own step saves write:
    once the loop has ended, Lightning has already counted that batch (and, mid-epoch, closed
    the epoch), so a checkpoint written then resumes into a new epoch with other data
    (``tests/test_graceful_stop.py``); and it marks the step saved, so ModelCheckpoint's
    end-of-epoch ``last`` save does not overwrite it with that state. ``on_train_end`` covers
    the other endings. A fit resumed from ``last.ckpt`` keeps its periodic saves there too."""

    def __init__(self) -> None:
        self._written_at: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """A fit resumed from ``last.ckpt`` keeps its ``last`` saves there (adopt_resumed_last)."""
        adopt_resumed_last(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        """At the fit's last batch, rewrite a stale ``last.ckpt`` with the mid-run loop state."""
        if ends_training(trainer) and self._written_at != trainer.global_step:
            save_final_last_checkpoints(trainer)
            self._written_at = trainer.global_step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Rewrite a ``last.ckpt`` still stale (training ended some other way)."""
        if self._written_at != trainer.global_step:
            save_final_last_checkpoints(trainer)
