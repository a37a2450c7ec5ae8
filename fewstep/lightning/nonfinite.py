"""Non-finite guard: a step whose loss or gradients hold NaN/inf is skipped (its gradients are
dropped before the optimiser sees them) and counted; after ``max_skipped`` such steps the fit
stops with an error. Weights, EMA and checkpoints never receive a non-finite value."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from fewstep.lightning.ema import EMA


class NonFiniteError(RuntimeError):
    """Raised when a run has too many non-finite steps, or holds non-finite weights."""


def _grads(optimizer: Optimizer) -> list[torch.Tensor]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return [p.grad for p in params if p.grad is not None]


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite: the max-abs of each (a fused foreach
    kernel, no overflow, NaN-propagating), then one host sync."""
    tensors = [t for t in tensors if t.numel()]  # the inf-norm of an empty tensor is undefined
    if not tensors:
        return True
    peaks = torch._foreach_norm(tensors, float("inf"))
    return bool(torch.isfinite(torch.stack(peaks)).all())


def non_finite_entries(state: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors in a nested state that hold NaN/inf."""
    bad: list[str] = []
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            bad += non_finite_entries(value, f"{name}.")
        elif torch.is_tensor(value) and value.is_floating_point() and not value.isfinite().all():
            bad.append(name)
    return bad


class NonFiniteGuard(Callback):
    """Skip optimiser steps with non-finite gradients (decided on all ranks together); stop
    after more than ``max_skipped`` of them in one fit (0: stop at the first)."""

    def __init__(self, max_skipped: int = 20) -> None:
        if max_skipped < 0:
            raise ValueError(f"NonFiniteGuard: max_skipped must be >= 0, got {max_skipped}")
        self.max_skipped = max_skipped
        self.skipped = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Drop this step's gradients if any rank has a non-finite one."""
        finite = trainer.strategy.reduce_boolean_decision(all_finite(_grads(optimizer)), all=True)
        if finite:
            return
        optimizer.zero_grad(set_to_none=True)  # params without .grad are left untouched
        self.skipped += 1
        pl_module.log("train/skipped_steps", float(self.skipped), reduce_fx="max")
        if self.skipped > self.max_skipped:
            raise NonFiniteError(
                f"NonFiniteGuard: {self.skipped} optimiser steps had non-finite gradients "
                f"(max_skipped={self.max_skipped}) at global step {trainer.global_step}; the "
                "last checkpoint is the last good state. Lower the learning rate or check the "
                "data, then resume from it."
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *_: Any
    ) -> None:
        """A finite gradient can still overflow the weights (e.g. a huge lr): stop then."""
        params = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        if not trainer.strategy.reduce_boolean_decision(all_finite(params), all=True):
            raise NonFiniteError(
                f"NonFiniteGuard: the weights became non-finite at global step "
                f"{trainer.global_step}; nothing was saved from this step. Lower the learning "
                "rate, then resume from the last checkpoint."
            )

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse to write a checkpoint that holds a non-finite weight or EMA tensor."""
        bad = non_finite_entries(checkpoint.get("state_dict", {}))
        for callback in trainer.callbacks:
            if isinstance(callback, EMA):
                state = checkpoint.get("callbacks", {}).get(callback.state_key, {})
                bad += non_finite_entries(state, f"{callback.state_key}.")
        if bad:
            raise NonFiniteError(
                f"NonFiniteGuard: refusing to save a checkpoint with non-finite tensors {bad[:5]}"
            )

    def state_dict(self) -> dict[str, Any]:
        """The skip count, so a resumed run keeps counting."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the skip count."""
        self.skipped = int(state_dict.get("skipped", 0))
