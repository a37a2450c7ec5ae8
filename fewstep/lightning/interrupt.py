"""Graceful interruption: the first SIGINT/SIGTERM ends a fit after the current batch (so the
final ``last.ckpt`` holds a whole step; no end-of-fit validation first), a second one stops at
once; the signal is remembered so the console script can exit with 128 + its number."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def stop_now(trainer: pl.Trainer) -> None:
    """End the fit after this batch. Lightning runs a validation before it honours
    ``should_stop`` (meant for early stopping); a sampling validation can take minutes, so a stop
    request switches this trainer's validation off (``limit_val_batches = 0``, read live)."""
    trainer.should_stop = True
    trainer.limit_val_batches = 0


class GracefulStop(Callback):
    """Turns SIGINT/SIGTERM during ``fit`` into ``trainer.should_stop`` at the batch's end."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._trainer: pl.Trainer | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        """First signal: stop after this batch; then restore the old handlers (a second
        signal acts at once)."""
        self.received = signum
        if self._trainer is not None:
            stop_now(self._trainer)
        self._restore()

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Install the handlers. Lightning registers its own SIGTERM handler after
        ``on_fit_start`` (and ends with a SystemExit of status 0), so this replaces it here."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        self._trainer = trainer
        self._previous = {s: signal.getsignal(s) for s in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self._handle)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        """Stop every rank after this batch when any rank got a signal (one boolean all-reduce
        per batch under DDP/FSDP: a signal delivered to one process alone would otherwise stop
        it and leave the others waiting in their next collective); re-assert it each batch (a
        loop may reset ``should_stop``)."""
        received = self.received is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received:
            stop_now(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Give the signals back."""
        self._restore()
        self._trainer = None


def exit_status(trainer: pl.Trainer | None) -> int:
    """0, or 128 + the signal that stopped ``trainer``'s fit (shell convention)."""
    for callback in [] if trainer is None else trainer.callbacks:
        if isinstance(callback, GracefulStop) and callback.received is not None:
            return 128 + int(callback.received)
    return 0
