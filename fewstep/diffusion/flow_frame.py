"""Any noise process seen as a rectified flow (Liu et al. 2022; Kingma et al. 2021, §3).

x_t = alpha_t x0 + sigma_t eps, divided by (alpha_t + sigma_t), is the straight-line point
x_s = (1 - s) x0 + s eps at flow time s = sigma_t / (alpha_t + sigma_t) (the same signal-to-noise
ratio). So a network trained on a DDPM (eps or v prediction) is a flow in reparametrised time:
feed it x_t = (alpha_t + sigma_t) x_s at t(s), read (x0, eps) back through the usual conversions.
This lets reflow train, and Euler sample, a DDPM-time student as a flow (InstaFlow, Liu et al.
2023, §3 turns Stable Diffusion's eps-UNet into a flow the same way). Beyond the process's
noisiest time t_max (s > s(t_max), e.g. 0.9936 for PixArt's DDPM) the network is evaluated at
t_max, so the flow reaches pure noise at s = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoised, Denoiser, batch_time
from fewstep.diffusion.schedules import (
    DiscreteDDPM,
    NoiseProcess,
    RectifiedFlow,
    Spacing,
    StraightPath,
    broadcast,
)

BISECTION_STEPS = 64  # halvings of [t_clean, t_max]: below float64 resolution for T <= 2^10


def flow_time(process: NoiseProcess, t: Tensor | float) -> Tensor:
    """s(t) = sigma_t / (alpha_t + sigma_t): the flow time with the SNR of process time t."""
    alpha, sigma = process.alpha_sigma(t)
    return sigma / (alpha + sigma)


def _ddpm_time(process: DiscreteDDPM, s: Tensor) -> Tensor:
    """t(s) for DiscreteDDPM in closed form: abar = (1 - s)^2 / ((1 - s)^2 + s^2), then the
    inverse of its piecewise-linear log alphas_cumprod (see DiscreteDDPM.alpha_sigma)."""
    log_abar = 2.0 * torch.log1p(-s) - torch.log((1.0 - s) ** 2 + s * s)
    table = process._log_abar.to(s.device)  # [T + 1] descending; index i is time i - 1
    lo = torch.searchsorted(-table, -log_abar, right=True) - 1
    lo = lo.clamp(0, process.num_train_timesteps - 1)
    w = (table[lo] - log_abar) / (table[lo] - table[lo + 1])
    return (lo - 1.0 + w).clamp(process.t_clean, process.t_max)


def process_time(process: NoiseProcess, s: Tensor | float) -> Tensor:
    """t(s), the inverse of flow_time (s(t) increases with t), clamped to [t_clean, t_max]:
    identity for RectifiedFlow, closed form for DiscreteDDPM, else bisection. float64."""
    s = torch.as_tensor(s, dtype=torch.float64)
    if isinstance(process, RectifiedFlow):
        return s.clamp(process.t_clean, process.t_max)
    if isinstance(process, DiscreteDDPM):
        return _ddpm_time(process, s)
    lo = torch.full_like(s, process.t_clean)
    hi = torch.full_like(s, process.t_max)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        below = flow_time(process, mid) < s
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return torch.where(s >= flow_time(process, process.t_max), hi, 0.5 * (lo + hi))


def frame_scale(process: NoiseProcess, t: Tensor | float) -> Tensor:
    """alpha_t + sigma_t: x_t = (alpha_t + sigma_t) x_s (exactly 1 for rectified flow)."""
    alpha, sigma = process.alpha_sigma(t)
    return torch.ones_like(alpha) if isinstance(process, RectifiedFlow) else alpha + sigma


def network_input(process: NoiseProcess, x: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, t [B]) of the base process for flow state x [B, ...] at flow times s [B]."""
    t = process_time(process, s)
    return x * broadcast(frame_scale(process, t), x), t.to(x.device)


class FlowTime(StraightPath):
    """Rectified flow x_s = (1 - s) x0 + s eps, s in [0, 1] (StraightPath), over a base
    process's network: model_time(s) = base.model_time(t(s)). Euler/Heun sample it; the denoiser
    must feed the network the rescaled state (see FlowFrameDenoiser)."""

    def __init__(self, base: NoiseProcess) -> None:
        self.base = base
        super().__init__()

    def model_time(self, t: Tensor) -> Tensor:
        """The base network's timestep input at the base time t(s)."""
        return self.base.model_time(process_time(self.base, t).to(t.device))

    def timesteps(
        self, num_steps: int, spacing: Spacing = "trailing", final: float | None = None
    ) -> Tensor:
        """linspace(1, 0, N + 1)[:N] (uniform in s, as Liu et al. 2022 sample), then final."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if spacing != "trailing":
            raise ValueError(f"FlowTime supports spacing 'trailing' only, got {spacing!r}")
        s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
        end = torch.tensor([self.t_clean if final is None else final], dtype=torch.float64)
        return torch.cat([s, end])


@dataclass(eq=False)
class FlowFrameDenoiser(Denoiser):
    """A base-process network as a flow-time Denoiser (process = FlowTime(base)): at (x_s, s) it
    evaluates the network at (scale(t) x_s, t(s)), keeps its x0 and returns eps = (x_s - (1 - s)
    x0) / s, so x_s = (1 - s) x0 + s eps holds in the flow frame (also past t_max, t clamped)."""

    @classmethod
    def wrap(cls, denoiser: Denoiser) -> FlowFrameDenoiser:
        """The flow-time view of a base-process denoiser (same network and parameterisation)."""
        return cls(
            denoiser.net, FlowTime(denoiser.process), denoiser.prediction, denoiser.learned_sigma
        )

    @property
    def base(self) -> Denoiser:
        """The network as a denoiser on its own (base) process."""
        assert isinstance(self.process, FlowTime)
        return Denoiser(self.net, self.process.base, self.prediction, self.learned_sigma)

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The network's prediction (its own kind) at flow state x and flow time t (= s)."""
        base = self.base
        x_t, t_base = network_input(base.process, x, batch_time(t, x).double())
        return base.raw(x_t, t_base, **cond)

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Denoised:
        """(x0, eps) in the flow frame at flow state x and flow time t (= s)."""
        base = self.base
        s = batch_time(t, x).double()
        x_t, t_base = network_input(base.process, x, s)
        x0 = base(x_t, t_base, **cond).x0
        s_b = broadcast(s, x0)
        return Denoised(x0, (x.to(x0.dtype) - (1.0 - s_b) * x0) / s_b)


def as_flow(denoiser: Denoiser) -> Denoiser:
    """The denoiser as a flow-time denoiser: itself on RectifiedFlow, else FlowFrameDenoiser."""
    if isinstance(denoiser.process, RectifiedFlow | FlowTime):
        return denoiser
    return FlowFrameDenoiser.wrap(denoiser)
