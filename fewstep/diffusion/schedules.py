"""Noise processes x_t = alpha(t) x0 + sigma(t) eps: PixArt's discrete DDPM and rectified flow."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Spacing = Literal["linspace", "leading", "trailing"]
BetaSchedule = Literal["linear", "scaled_linear"]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """Resolution shift t' = s t / (1 + (s - 1) t) (Esser et al. 2024, eq. 23): s > 1 -> noisier."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def broadcast(coef: Tensor | float, x: Tensor) -> Tensor:
    """Per-sample coefficients [B] (or a scalar) -> [B, 1, ..., 1] in x's dtype and device."""
    coef = torch.as_tensor(coef, device=x.device).to(x.dtype)
    if coef.ndim == 0:
        return coef
    return coef.reshape(-1, *([1] * (x.ndim - 1)))  # [B] -> [B, 1, ..., 1]


class NoiseProcess(ABC):
    """Forward process x_t = alpha(t) x0 + sigma(t) eps over process time t (Kingma et al. 2021,
    eq. 1). Samplers and losses see only alpha, sigma and model_time; the network sees only
    model_time(t)."""

    t_clean: float  # process time of the data: alpha = 1, sigma = 0
    t_max: float  # the noisiest time the network is trained on

    @abstractmethod
    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) in float64, same shape as t."""

    @abstractmethod
    def model_time(self, t: Tensor) -> Tensor:
        """Process time -> the network's timestep input (the single place that scale is set)."""

    @abstractmethod
    def timesteps(
        self, num_steps: int, spacing: Spacing = "trailing", final: float | None = None
    ) -> Tensor:
        """num_steps + 1 descending process times (float64); the last, `final` (default t_clean),
        is where sampling ends and is never fed to the network."""

    def alpha_sigma_derivative(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(d alpha / dt, d sigma / dt) for ODE samplers; only continuous-time processes have it."""
        raise NotImplementedError(
            f"{type(self).__name__} has no continuous-time ODE; Euler/Heun need a continuous "
            "process such as RectifiedFlow — use DDIM or DPM-Solver++ instead."
        )

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) eps with per-sample t [B] (Ho et al. 2020, eq. 4)."""
        alpha, sigma = self.alpha_sigma(t)
        return broadcast(alpha, x0) * x0 + broadcast(sigma, x0) * eps


def _betas(schedule: BetaSchedule, start: float, end: float, n: int) -> np.ndarray:
    """Beta schedule in float64: linear (Ho et al. 2020, §4) or scaled-linear (Rombach et al.)."""
    if schedule == "linear":
        return np.linspace(start, end, n, dtype=np.float64)
    if schedule == "scaled_linear":
        return np.linspace(start**0.5, end**0.5, n, dtype=np.float64) ** 2
    raise ValueError(f"beta_schedule must be 'linear' or 'scaled_linear', got {schedule!r}")


class DiscreteDDPM(NoiseProcess):
    """DDPM variance-preserving process with alpha = sqrt(alphas_cumprod[t]) (Ho et al. 2020);
    PixArt-Σ uses linear betas 1e-4..0.02 over 1000 steps. Time t is diffusers' 0-based training
    timestep in [0, T-1]; t = -1 is the data (Ho et al.'s 1-based x_0, alphas_cumprod = 1).
    Fractional t interpolates log alphas_cumprod linearly. model_time(t) = t."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: BetaSchedule = "linear",
    ) -> None:
        self.num_train_timesteps = num_train_timesteps
        betas = _betas(beta_schedule, beta_start, beta_end, num_train_timesteps)
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))  # [T] float64
        self._log_abar = torch.cat([torch.zeros(1, dtype=torch.float64), self.alphas_cumprod.log()])
        self.t_clean = -1.0
        self.t_max = float(num_train_timesteps - 1)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """sqrt(abar_t), sqrt(1 - abar_t) with abar_{-1} = 1 (Ho et al. 2020, eq. 4)."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(self.t_clean, self.t_max) + 1.0
        table = self._log_abar.to(t.device)  # index i holds log abar at time i - 1
        lo = t.floor().long().clamp(max=self.num_train_timesteps - 1)
        w = t - lo
        abar = (table[lo] * (1.0 - w) + table[lo + 1] * w).exp()
        return abar.sqrt(), (1.0 - abar).clamp(min=0.0).sqrt()

    def model_time(self, t: Tensor) -> Tensor:
        """The DiT is fed the training timestep itself (PixArt / diffusers convention)."""
        return t

    def timesteps(
        self, num_steps: int, spacing: Spacing = "trailing", final: float | None = None
    ) -> Tensor:
        """Table 2 spacings of Lin et al. 2024 (= diffusers DDIMScheduler.set_timesteps), then
        `final` (default t_clean; 0.0 reproduces DDIMScheduler(set_alpha_to_one=False))."""
        n_train = self.num_train_timesteps
        if not 1 <= num_steps <= n_train:
            raise ValueError(f"num_steps must be in [1, {n_train}], got {num_steps}")
        if spacing == "linspace":
            ts = np.linspace(0, n_train - 1, num_steps).round()[::-1]
        elif spacing == "leading":
            ts = (np.arange(num_steps) * (n_train // num_steps)).round()[::-1]
        elif spacing == "trailing":
            ts = np.round(np.arange(n_train, 0, -n_train / num_steps)) - 1
        else:
            raise ValueError(f"spacing must be linspace, leading or trailing, got {spacing!r}")
        end = self.t_clean if final is None else final
        return torch.tensor([*ts.astype(np.int64).tolist(), end], dtype=torch.float64)


class StraightPath(NoiseProcess):
    """The straight path x_t = (1 - t) x0 + t eps, t in [0, 1] (Liu et al. 2022, eq. 1): alpha,
    sigma and their derivatives; subclasses say what the network is fed and how to step."""

    def __init__(self) -> None:
        self.t_clean = 0.0
        self.t_max = 1.0

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """alpha = 1 - t, sigma = t (Esser et al. 2024, eq. 3 with the rectified-flow path)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1.0 - t, t

    def alpha_sigma_derivative(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """d alpha/dt = -1, d sigma/dt = 1: the velocity is eps - x0 (Liu et al. 2022, eq. 1)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -torch.ones_like(t), torch.ones_like(t)


class RectifiedFlow(StraightPath):
    """Rectified flow x_t = (1 - t) x0 + t eps, t in [0, 1] (Liu et al. 2022; Esser et al. 2024,
    eq. 3). The network is fed model_time = t * num_train_timesteps (SD3 / diffusers). `shift`
    only sets the default sampling schedule (SD3 eq. 23)."""

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000) -> None:
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        super().__init__()

    def model_time(self, t: Tensor) -> Tensor:
        """The network sees t * num_train_timesteps, as SD3 and FlowMatchEulerDiscreteScheduler."""
        return t * self.num_train_timesteps

    def timesteps(
        self, num_steps: int, spacing: Spacing = "trailing", final: float | None = None
    ) -> Tensor:
        """'trailing': shift(linspace(1, 0, N + 1))[:N]. 'linspace': diffusers' FlowMatchEuler grid
        shift(linspace(1, shift(1/T), N)), shifting its already shifted sigma_min. Then final."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if spacing == "trailing":
            t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        elif spacing == "linspace":
            t_min = float(shift_time(torch.tensor(1.0 / self.num_train_timesteps), self.shift))
            t = torch.from_numpy(np.linspace(1.0, t_min, num_steps))
        else:
            raise ValueError(
                f"RectifiedFlow supports spacing 'trailing' or 'linspace', got {spacing!r} "
                "('leading' would evaluate the network at t = 0, where sigma = 0)"
            )
        end = torch.tensor([self.t_clean if final is None else final], dtype=torch.float64)
        return torch.cat([shift_time(t, self.shift), end])
