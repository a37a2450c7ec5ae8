"""Learning-rate schedules the YAML configs can name (``class_path``), beyond torch's own."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def wsd_factor(step: int, warmup: int, total: int, decay: float, final: float) -> float:
    """Warmup-stable-decay multiplier (Hägele et al. 2024, "Scaling Laws and Compute-Optimal
    Training Beyond Fixed Training Durations", §3): linear warm-up over ``warmup`` steps,
    constant, then a cosine from 1 to ``final`` over the last ``decay`` fraction of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    start = total - round(decay * total)
    if step < start:
        return 1.0
    progress = min((step - start) / max(total - start, 1), 1.0)
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupStableDecay(LRScheduler):
    """Per-step warmup-stable-decay schedule (see ``wsd_factor``): a long run can stay at its
    peak lr and anneal only at the end, when the total length is known."""

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        decay_fraction: float = 0.2,
        final_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not 0 <= warmup_steps < total_steps or not 0.0 <= decay_fraction <= 1.0:
            raise ValueError(
                f"WarmupStableDecay: need 0 <= warmup_steps ({warmup_steps}) < total_steps "
                f"({total_steps}) and decay_fraction ({decay_fraction}) in [0, 1]"
            )
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.decay_fraction, self.final_factor = decay_fraction, final_factor
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """Each group's base lr times the schedule's factor at this step."""
        factor = wsd_factor(
            self.last_epoch,
            self.warmup_steps,
            self.total_steps,
            self.decay_fraction,
            self.final_factor,
        )
        return [base * factor for base in self.base_lrs]
