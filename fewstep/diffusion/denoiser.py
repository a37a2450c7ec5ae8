"""The denoiser: a raw network plus its process and parameterisation, returning (x0, eps)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from fewstep.diffusion.parameterization import PredictionType, to_x0_eps
from fewstep.diffusion.schedules import NoiseProcess, broadcast


@dataclass(frozen=True, eq=False)
class Denoised:
    """A denoiser's estimate at (x_t, t): x0 and eps with x_t = alpha x0 + sigma eps."""

    x0: Tensor
    eps: Tensor


class SamplerDenoiser(Protocol):
    """What samplers call: conditioning already bound, (x_t, t) -> Denoised, plus its process."""

    process: NoiseProcess

    def __call__(self, x: Tensor, t: Tensor) -> Denoised:
        """Estimate (x0, eps) at x [B, ...] and process time t ([] or [B])."""
        ...


def batch_time(t: Tensor | float, x: Tensor) -> Tensor:
    """Process time as [B] on x's device (a scalar is shared by the whole batch)."""
    t = torch.as_tensor(t, device=x.device)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


@dataclass(eq=False)
class Denoiser:
    """Wraps `net(x, model_time, **cond) -> Tensor` knowing nothing of schedules: converts its
    output (kind `prediction`) to (x0, eps) on `process`. With `learned_sigma` the network emits
    2C channels (PixArt / Nichol & Dhariwal 2021 learned variance) and only the first C are used."""

    net: Callable[..., Tensor]
    process: NoiseProcess
    prediction: PredictionType = "epsilon"
    learned_sigma: bool = False

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The network's prediction [B, C, ...] in its own parameterisation."""
        model_t = self.process.model_time(batch_time(t, x)).float()
        out = self.net(x, model_t, **cond)
        if self.learned_sigma:
            out = out[:, : x.shape[1]]  # [B, 2C, ...] -> [B, C, ...]: drop the variance channels
        return out

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Denoised:
        """(x0, eps) at x_t = x, computed in at least float32."""
        t = batch_time(t, x)
        pred = self.raw(x, t, **cond)
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, pred = x.to(dtype), pred.to(dtype)
        alpha, sigma = self.process.alpha_sigma(t)
        x0, eps = to_x0_eps(pred, x, broadcast(alpha, x), broadcast(sigma, x), self.prediction)
        return Denoised(x0, eps)

    def bind(self, **cond: Tensor) -> Conditioned:
        """This denoiser with fixed conditioning, in the form samplers call."""
        return Conditioned(self, cond)


@dataclass(eq=False)
class Conditioned:
    """A Denoiser with its conditioning bound: (x, t) -> Denoised."""

    denoiser: Denoiser
    cond: dict[str, Tensor] = field(default_factory=dict)

    @property
    def process(self) -> NoiseProcess:
        """The wrapped denoiser's process."""
        return self.denoiser.process

    def __call__(self, x: Tensor, t: Tensor | float) -> Denoised:
        """The conditional estimate."""
        return self.denoiser(x, t, **self.cond)
