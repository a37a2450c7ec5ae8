"""Exponential moving average of a network's weights (Polyak & Juditsky 1992), as a callback."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from fewstep.lightning.fsdp_params import clean_name, fsdp_root
from fewstep.models.shadow_weights import ShadowWeights, trainable_parameters


def warmup_decay(decay: float, num_updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)) after n updates (the warm-up of diffusers' EMAModel and
    TensorFlow's ExponentialMovingAverage ``num_updates``): early averages do not drag in the
    initial weights for thousands of steps."""
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates))


def average_dtype(param: Tensor) -> torch.dtype:
    """float32 for 16-bit weights (a bf16 average at decay 0.999 hardly moves: the update is
    below bf16's resolution), else the weights' own dtype."""
    return torch.float32 if param.dtype in (torch.bfloat16, torch.float16) else param.dtype


class EMA(pl.Callback):
    """Keeps ema <- decay * ema + (1 - decay) * param for the trainable floating-point parameters
    of ``getattr(pl_module, attribute)``; swaps the average in for validation, checkpoints it.
    With ``warmup`` the decay ramps up as ``warmup_decay`` (without it, a 0.998 average still
    holds 37 % of the initial weights after 500 steps).

    Under FSDP the average is kept sharded like the parameters (each rank averages its shard),
    named by the full parameter names; the checkpoint stores it gathered to full tensors, the
    same format as on one device, so a run resumes and exports on any number of devices. The
    average is a ``ShadowWeights`` (as LCM's target network θ⁻)."""

    def __init__(
        self,
        decay: float = 0.999,
        update_every: int = 1,
        attribute: str = "ema_target",
        warmup: bool = True,
    ):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if update_every < 1:
            raise ValueError(f"EMA update_every must be >= 1, got {update_every}")
        self.decay, self.update_every, self.attribute = decay, update_every, attribute
        self.warmup = warmup
        self._weights: ShadowWeights | None = None  # the average, once built
        self.num_updates = 0
        self._steps_seen = 0
        self._last_global_step = -1
        self._loaded: dict[str, Any] | None = None
        self._backup: list[Tensor] | None = None
        self._module: pl.LightningModule | None = None  # set once the average is built

    @property
    def names(self) -> list[str]:
        """The averaged parameters' full names (empty until the average is built)."""
        return self._weights.names if self._weights is not None else []

    @property
    def shadow(self) -> list[Tensor]:
        """The average, aligned with ``names`` (this rank's shards under FSDP)."""
        return self._weights.values if self._weights is not None else []

    def target(self, pl_module: pl.LightningModule) -> nn.Module:
        """The network being averaged."""
        module = getattr(pl_module, self.attribute, None)
        if not isinstance(module, nn.Module):
            raise AttributeError(
                f"EMA(attribute={self.attribute!r}): {type(pl_module).__name__} has no nn.Module "
                f"attribute {self.attribute!r}; set EMA.attribute to the network to average."
            )
        return module

    def _named(self, pl_module: pl.LightningModule) -> dict[str, nn.Parameter]:
        """The target's parameters by their unwrapped names (FSDP inserts wrapper prefixes)."""
        return {clean_name(n): p for n, p in self.target(pl_module).named_parameters()}

    def _params(self, pl_module: pl.LightningModule) -> list[nn.Parameter]:
        """The averaged parameters, in ``self.names`` order."""
        params = self._named(pl_module)
        return [params[name] for name in self.names]

    @staticmethod
    def _fsdp(pl_module: pl.LightningModule) -> Any:
        """The FSDP root wrapping ``pl_module`` (its parameters are sharded), or None."""
        trainer = pl_module._trainer
        return fsdp_root(trainer.strategy.model) if trainer is not None else None

    def _ensure_ready(self, pl_module: pl.LightningModule) -> bool:
        """Build the shadow copy (from a loaded checkpoint state if any); False if impossible."""
        if self._weights is not None:
            return True
        if self._loaded is None and pl_module.trainer.state.fn != TrainerFn.FITTING:
            return False  # validate/test without a fitted or loaded average: nothing to swap
        named = trainable_parameters(self.target(pl_module))
        names, params = list(named), list(named.values())
        self._module = pl_module
        root = self._fsdp(pl_module)
        full = [root is None] * len(params)  # under FSDP every rank averages its shards
        if self._loaded is None:
            self._weights = ShadowWeights.copy_of(names, params, full, dtype=average_dtype)
            return True
        saved = self._loaded["shadow"]
        missing = [n for n in names if n not in saved]
        if missing:
            raise KeyError(f"EMA checkpoint state lacks parameters {missing[:5]}")
        self._weights = ShadowWeights.from_full(saved, names, params, full, root, average_dtype)
        self._loaded = None
        return True

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Initialise the average from the current weights, or from the resumed checkpoint."""
        self._ensure_ready(pl_module)

    @torch.no_grad()
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Update after every ``update_every``-th batch that stepped an optimiser."""
        if trainer.global_step == self._last_global_step:  # gradient accumulation: no step
            return
        self._last_global_step = trainer.global_step
        self._steps_seen += 1
        if self._steps_seen % self.update_every == 0:
            self.update(pl_module)

    @torch.no_grad()
    def update(self, pl_module: pl.LightningModule) -> None:
        """One EMA step: ema = lerp(ema, param, 1 - decay) (decay warmed up if ``warmup``)."""
        self._ensure_ready(pl_module)
        assert self._weights is not None
        self._weights.lerp_(self._params(pl_module), 1.0 - self.current_decay())
        self.num_updates += 1

    def current_decay(self) -> float:
        """The decay the next update uses."""
        return warmup_decay(self.decay, self.num_updates) if self.warmup else self.decay

    @torch.no_grad()
    def swap_in(self, pl_module: pl.LightningModule) -> None:
        """Back up the training weights and load the averaged ones."""
        if self._backup is not None or not self._ensure_ready(pl_module):
            return
        params = self._params(pl_module)
        self._backup = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, self.shadow)

    @torch.no_grad()
    def swap_out(self, pl_module: pl.LightningModule) -> None:
        """Restore the training weights saved by ``swap_in``."""
        if self._backup is None:
            return
        torch._foreach_copy_(self._params(pl_module), self._backup)
        self._backup = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Validate with the averaged weights."""
        self.swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Back to the training weights (before ModelCheckpoint, which Lightning runs last)."""
        self.swap_out(pl_module)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Never leave the averaged weights in place of the training weights."""
        self.swap_out(pl_module)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Copy the averaged weights into ``module`` (the target network or a copy of it)."""
        if not self.shadow and self._loaded is None:
            raise RuntimeError("EMA.copy_to: no average yet (train, or load a checkpoint first)")
        if self.shadow and self._module is not None and self._fsdp(self._module) is not None:
            raise RuntimeError(
                "EMA.copy_to: the average is sharded (FSDP); export it from a checkpoint "
                "(fewstep.lightning.checkpoints.apply_ema), which holds it gathered."
            )
        params = dict(module.named_parameters())
        saved = (
            self._loaded["shadow"]
            if not self.shadow
            else dict(zip(self.names, self.shadow, strict=True))
        )
        for name, value in saved.items():
            params[name].copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """Averaged weights by name plus counters, stored in the Lightning checkpoint."""
        if self._loaded is not None and not self.shadow:
            return self._loaded
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "steps_seen": self._steps_seen,
            "shadow": self._full_shadow(),
        }

    def _full_shadow(self) -> dict[str, Tensor]:
        """The average as full CPU tensors by name; under FSDP gathered (a collective: Lightning
        asks every rank for callback states) and kept on rank 0 only, which writes checkpoints."""
        if self._weights is None or self._module is None:
            return {}
        root = self._fsdp(self._module)
        return self._weights.full_state(root, self._params(self._module))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore on resume; tensors move to the parameters' device at fit start."""
        self._loaded = state_dict
        self.num_updates = int(state_dict.get("num_updates", 0))
        self._steps_seen = int(state_dict.get("steps_seen", 0))
        self._weights, self._module = None, None
