"""The first SIGINT/SIGTERM ends a fit after the current batch: no end-of-fit validation first
(Lightning validates when ``should_stop`` is set; with a 512-prompt sampling validation that
took minutes, and a second signal then lost the run), and ``last.ckpt`` holds that step."""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from student_fixtures import build_tiny_teacher, quiet_trainer

from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.lightning.checkpoints import load_module
from fewstep.lightning.final_checkpoint import FinalLastCheckpoint
from fewstep.lightning.interrupt import GracefulStop


class SignalAt(Callback):
    """Sends ``signum`` to this process at the end of training batch ``step``."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class CountValidations(Callback):
    """Counts validation runs during fit."""

    def __init__(self) -> None:
        self.runs = 0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.runs += 1


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_ends_the_fit_after_the_batch_without_validating_first(tmp_path, signum):
    teacher = build_tiny_teacher(tmp_path / "teacher")
    module = load_module(teacher.config)
    data = CachedLatentDataModule(str(teacher.cache), batch_size=4, val_fraction=0.25)
    stop, validations = GracefulStop(), CountValidations()
    checkpoints = ModelCheckpoint(tmp_path / "ckpt", save_last=True, every_n_train_steps=100)
    trainer = quiet_trainer(
        50,
        tmp_path,
        limit_val_batches=1,
        val_check_interval=20,  # a scheduled validation after the signal would be at step 20
        check_val_every_n_epoch=None,
        enable_checkpointing=True,
        callbacks=[SignalAt(3, signum), validations, stop, checkpoints, FinalLastCheckpoint()],
    )
    previous = signal.getsignal(signum)
    trainer.fit(module, datamodule=data)
    assert stop.received == signum and trainer.global_step == 3
    assert validations.runs == 0  # stopped at once, no end-of-fit validation
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 3
    assert signal.getsignal(signum) == previous  # handlers given back


def _fit(
    teacher, root, max_steps: int, *callbacks, ckpt_path=None, every: int = 100
) -> pl.LightningModule:
    """``max_steps`` of the tiny teacher with last.ckpt in ``root/ckpt`` (a periodic save every
    ``every`` steps); the trained module."""
    pl.seed_everything(0, verbose=False)
    module = load_module(teacher.config)
    data = CachedLatentDataModule(str(teacher.cache), batch_size=4, val_fraction=0.25)
    checkpoints = ModelCheckpoint(root / "ckpt", save_last=True, every_n_train_steps=every)
    trainer = quiet_trainer(
        max_steps,
        root,
        enable_checkpointing=True,
        callbacks=[*callbacks, GracefulStop(), checkpoints, FinalLastCheckpoint()],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module


def test_a_run_resumed_from_the_signal_checkpoint_equals_an_uninterrupted_one(tmp_path):
    """The last.ckpt a stop writes (mid-epoch, at the end of fit) resumes exactly."""
    teacher = build_tiny_teacher(tmp_path / "teacher")
    reference = _fit(teacher, tmp_path / "straight", 7)
    _fit(teacher, tmp_path / "stopped", 7, SignalAt(3, signal.SIGTERM))
    last = tmp_path / "stopped" / "ckpt" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    resumed = _fit(teacher, tmp_path / "stopped", 7, ckpt_path=str(last))
    expected, got = reference.state_dict(), resumed.state_dict()
    assert list(expected) == list(got)
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


def _step(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


def test_a_resumed_run_keeps_its_periodic_saves_in_last_ckpt(tmp_path):
    """Stopped before its first periodic save, then resumed from last.ckpt: Lightning would
    write the periodic ``last`` saves to last-v1.ckpt, leaving last.ckpt at the old step for
    any crash; they go to last.ckpt. A new fit beside an old last.ckpt still leaves it alone."""
    teacher = build_tiny_teacher(tmp_path / "teacher")

    def fit(root, max_steps, *callbacks, ckpt_path=None):
        _fit(teacher, root, max_steps, *callbacks, ckpt_path=ckpt_path, every=4)

    run = tmp_path / "run"
    fit(run, 20, SignalAt(2, signal.SIGTERM))  # stopped before the first periodic save
    last = run / "ckpt" / "last.ckpt"
    assert _step(last) == 2
    fit(run, 20, SignalAt(9, signal.SIGTERM), ckpt_path=str(last))
    assert sorted(p.name for p in (run / "ckpt").glob("last*")) == ["last.ckpt"]
    assert _step(last) == 9

    class Crash(Exception):
        pass

    class CrashAt(Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 14:
                raise Crash  # no graceful stop: only the periodic saves are on disk

    with pytest.raises(Crash):
        fit(run, 20, CrashAt(), ckpt_path=str(last))
    assert _step(last) == 12  # the newest periodic save, not the resume point (9)
    assert sorted(p.name for p in (run / "ckpt").glob("last*")) == ["last.ckpt"]

    fit(run, 5)  # a new fit in the same folder: Lightning versions its own last save
    assert _step(last) == 12 and _step(run / "ckpt" / "last-v1.ckpt") == 5
