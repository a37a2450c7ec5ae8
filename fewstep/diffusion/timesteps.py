"""Training-time samplers of the process time t: uniform (discrete DDPM or continuous flow),
logit-normal and shifted (Esser et al. 2024, SD3 §3.1 and eq. 23)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fewstep.diffusion.schedules import shift_time


class TimestepSampler(ABC):
    """Draws one process time per sample: t [B] float32 (subclasses implement ``draw``)."""

    def __call__(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample t [batch]."""
        return self.draw(batch, device, generator)

    @abstractmethod
    def draw(
        self, batch: int, device: torch.device | str | None, generator: torch.Generator | None
    ) -> Tensor:
        """Sample t [batch] on ``device`` from ``generator``."""


class UniformDiscrete(TimestepSampler):
    """t ~ U{0, ..., T-1}: DiscreteDDPM training times (Ho et al. 2020, Alg. 1)."""

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps

    def draw(
        self, batch: int, device: torch.device | str | None, generator: torch.Generator | None
    ) -> Tensor:
        """Integer-valued float32 times in [0, T-1]."""
        t = torch.randint(0, self.num_train_timesteps, (batch,), device=device, generator=generator)
        return t.float()


class Uniform(TimestepSampler):
    """t ~ U(0, 1), then shifted (SD3 eq. 23): RectifiedFlow training times."""

    def __init__(self, shift: float = 1.0) -> None:
        self.shift = shift

    def draw(
        self, batch: int, device: torch.device | str | None, generator: torch.Generator | None
    ) -> Tensor:
        """Times in [0, 1)."""
        return shift_time(torch.rand(batch, device=device, generator=generator), self.shift)


class LogitNormal(TimestepSampler):
    """t = sigmoid(m + s n), n ~ N(0, 1) (SD3 eq. 19, 'rf/lognorm(m, s)'), then shifted (eq. 23)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> None:
        self.mean = mean
        self.std = std
        self.shift = shift

    def draw(
        self, batch: int, device: torch.device | str | None, generator: torch.Generator | None
    ) -> Tensor:
        """Times in (0, 1), median sigmoid(m) before the shift."""
        n = torch.randn(batch, device=device, generator=generator)
        return shift_time(torch.sigmoid(self.mean + self.std * n), self.shift)
