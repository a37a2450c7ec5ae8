"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models", §2): x_t = cos(t) x0 + sin(t) z, t in [0, pi/2], with the network predicting the velocity
F = dx_t/dt = cos(t) z - sin(t) x0 (eq. 2). Here in units of sigma_d (x0 the teacher's latents, z
unit noise); the sCM method scales by sigma_d where the paper does.

Any process x_t = alpha x0 + sigma eps is TrigFlow at the same signal-to-noise ratio: t_trig =
atan2(sigma, alpha) and x_trig = x_t / sqrt(alpha^2 + sigma^2) (SANA-Sprint, Chen et al. 2025,
§3.1: for rectified flow t = arctan(s / (1 - s)), x_trig = x_flow / sqrt(s^2 + (1 - s)^2); a VP
DDPM is TrigFlow up to the time change). Both share (x0, eps), so a prediction of any kind
converts through `parameterization` (F is v-prediction on TrigFlow: alpha = cos, sigma = sin).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoised, Denoiser, batch_time
from fewstep.diffusion.flow_frame import process_time
from fewstep.diffusion.guidance import GuidanceEmbedded
from fewstep.diffusion.parameterization import PredictionType, from_x0_eps, to_x0_eps
from fewstep.diffusion.schedules import NoiseProcess, Spacing, broadcast

HALF_PI = math.pi / 2


def trig_time(process: NoiseProcess, t: Tensor | float) -> Tensor:
    """t_trig = atan2(sigma_t, alpha_t): the TrigFlow time with the SNR of process time t."""
    alpha, sigma = process.alpha_sigma(t)
    return torch.atan2(sigma, alpha)


def base_time(process: NoiseProcess, t_trig: Tensor | float) -> Tensor:
    """The process time with the SNR of TrigFlow time t_trig (inverse of trig_time, clamped to
    [t_clean, t_max]) via the flow time s = sin / (sin + cos) (`flow_frame.process_time`)."""
    t_trig = torch.as_tensor(t_trig, dtype=torch.float64)
    s = torch.sin(t_trig) / (torch.sin(t_trig) + torch.cos(t_trig))
    return process_time(process, s)


def trig_scale(process: NoiseProcess, t: Tensor | float) -> Tensor:
    """sqrt(alpha_t^2 + sigma_t^2): x_t = trig_scale * x_trig (1 for VP processes)."""
    alpha, sigma = process.alpha_sigma(t)
    return torch.sqrt(alpha * alpha + sigma * sigma)


def to_trigflow(process: NoiseProcess, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """(x_trig, t_trig [B]) of the process state x [B, ...] at process times t [B]."""
    return x / broadcast(trig_scale(process, t), x), trig_time(process, t).to(x.device)


def from_trigflow(process: NoiseProcess, x_trig: Tensor, t_trig: Tensor) -> tuple[Tensor, Tensor]:
    """(x_t, t [B]) of the process for TrigFlow state x_trig [B, ...] at times t_trig [B]."""
    t = base_time(process, t_trig)
    return x_trig * broadcast(trig_scale(process, t), x_trig), t.to(x_trig.device)


def trig_velocity(d: Denoised, t_trig: Tensor) -> Tensor:
    """F = cos(t) eps - sin(t) x0, the TrigFlow PF-ODE velocity dx_trig/dt (sCM eq. 2)."""
    cos, sin = (broadcast(c, d.x0) for c in (torch.cos(t_trig), torch.sin(t_trig)))
    return from_x0_eps(d.x0, d.eps, cos, sin, "v")


def to_trig_prediction(
    pred: Tensor, x: Tensor, t: Tensor, process: NoiseProcess, kind: PredictionType
) -> Tensor:
    """The TrigFlow velocity F at the point equivalent to (x, t) from a `kind` prediction there."""
    alpha, sigma = (broadcast(c, x) for c in process.alpha_sigma(t))
    x0, eps = to_x0_eps(pred, x, alpha, sigma, kind)
    return trig_velocity(Denoised(x0, eps), trig_time(process, t).to(x.device))


def from_trig_prediction(
    velocity: Tensor, x_trig: Tensor, t_trig: Tensor, process: NoiseProcess, kind: PredictionType
) -> Tensor:
    """The `kind` prediction at the process point equivalent to (x_trig, t_trig) from F there."""
    cos, sin = (broadcast(c, x_trig) for c in (torch.cos(t_trig), torch.sin(t_trig)))
    x0, eps = to_x0_eps(velocity, x_trig, cos, sin, "v")
    alpha, sigma = (broadcast(c, x_trig) for c in process.alpha_sigma(base_time(process, t_trig)))
    return from_x0_eps(x0, eps, alpha, sigma, kind)


class TrigFlowTime(NoiseProcess):
    """TrigFlow x_t = cos(t) x0 + sin(t) z over a base process's network: model_time(t) =
    base.model_time(base_time(t)); the sampling grid is the base grid mapped by trig_time."""

    def __init__(self, base: NoiseProcess) -> None:
        self.base = base
        self.t_clean = 0.0
        self.t_max = float(trig_time(base, base.t_max))  # pi / 2 for rectified flow

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(cos t, sin t) in float64 (sCM §2)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.cos(t), torch.sin(t)

    def alpha_sigma_derivative(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(-sin t, cos t): the PF-ODE velocity is cos(t) eps - sin(t) x0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return -torch.sin(t), torch.cos(t)

    def model_time(self, t: Tensor) -> Tensor:
        """The base network's timestep input at the base time of the same SNR."""
        return self.base.model_time(base_time(self.base, t).to(t.device))

    def timesteps(
        self, num_steps: int, spacing: Spacing = "trailing", final: float | None = None
    ) -> Tensor:
        """The base process's grid in TrigFlow time (e.g. flow [1, .5, 0] -> [pi/2, pi/4, 0])."""
        ts = trig_time(self.base, self.base.timesteps(num_steps, spacing))
        if final is not None:
            ts[-1] = final
        return ts


@dataclass(eq=False)
class TrigFlowDenoiser(Denoiser):
    """A base-process network seen in TrigFlow coordinates (process = TrigFlowTime(base)): at
    (x_trig, t_trig) it runs the network at (trig_scale x_trig, base_time(t_trig)) and returns the
    shared (x0, eps); past the base's t_max (DDPM) eps is re-derived from x_trig = cos x0 + sin
    eps. The model time keeps x's precision (>= float32) so that float64 JVPs are exact."""

    @classmethod
    def wrap(cls, denoiser: Denoiser) -> TrigFlowDenoiser:
        """The TrigFlow view of a base-process denoiser (same network and parameterisation)."""
        base = denoiser.process
        if isinstance(base, TrigFlowTime):
            return cls(denoiser.net, base, denoiser.prediction, denoiser.learned_sigma)
        return cls(denoiser.net, TrigFlowTime(base), denoiser.prediction, denoiser.learned_sigma)

    @property
    def base(self) -> Denoiser:
        """The network as a denoiser on its own (base) process."""
        assert isinstance(self.process, TrigFlowTime)
        return Denoiser(self.net, self.process.base, self.prediction, self.learned_sigma)

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The network's prediction (its own kind) at TrigFlow state x and time t."""
        base = self.base.process
        x_base, t_base = from_trigflow(base, x, batch_time(t, x))
        model_t = base.model_time(t_base).to(torch.promote_types(x.dtype, torch.float32))
        out = self.net(x_base, model_t, **cond)
        return out[:, : x.shape[1]] if self.learned_sigma else out  # drop variance channels

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Denoised:
        """(x0, eps) at TrigFlow state x and time t, in at least float32."""
        t = batch_time(t, x)
        dtype = torch.promote_types(x.dtype, torch.float32)
        pred, x = self.raw(x, t, **cond).to(dtype), x.to(dtype)
        base = self.base.process
        x_base, t_base = from_trigflow(base, x, t)
        alpha, sigma = (broadcast(c, x) for c in base.alpha_sigma(t_base))
        x0, eps = to_x0_eps(pred, x_base, alpha, sigma, self.prediction)
        cos, sin = (broadcast(c, x) for c in (torch.cos(t), torch.sin(t)))
        beyond = (t > self.process.t_max).reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, 1, 1]
        derived = (x - cos * x0) / sin.clamp(min=1e-12)
        return Denoised(x0, torch.where(beyond, derived, eps))

    def velocity(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """F(x, t) = cos(t) eps - sin(t) x0, the TrigFlow velocity of this network (sCM eq. 2)."""
        return trig_velocity(self(x, t, **cond), batch_time(t, x))


@dataclass(eq=False)
class GuidanceEmbeddedTrigFlow(TrigFlowDenoiser, GuidanceEmbedded):
    """TrigFlowDenoiser over a guidance-embedded network (FLUX.1-dev; Meng et al. 2023 §3.1):
    calls without ``guidance=`` use ``scale``, and ClassifierFreeGuidance sees a
    GuidanceEmbedded and makes its one pass."""

    def raw(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Tensor:
        """The network's prediction at TrigFlow (x, t) and the call's (or default) scale."""
        if "guidance" not in cond:
            cond["guidance"] = torch.full((x.shape[0],), self.scale, device=x.device)
        return TrigFlowDenoiser.raw(self, x, t, **cond)

    @property
    def base(self) -> Denoiser:
        """The network on its own process, keeping its default scale."""
        assert isinstance(self.process, TrigFlowTime)
        net, base = self.net, self.process.base
        return GuidanceEmbedded(net, base, self.prediction, self.learned_sigma, scale=self.scale)


def as_trigflow(denoiser: Denoiser) -> TrigFlowDenoiser:
    """The denoiser in TrigFlow coordinates (itself if already there), keeping a
    guidance-embedded network's default scale."""
    if isinstance(denoiser, TrigFlowDenoiser):
        return denoiser
    view = TrigFlowDenoiser.wrap(denoiser)
    if not isinstance(denoiser, GuidanceEmbedded):
        return view
    return GuidanceEmbeddedTrigFlow(
        view.net, view.process, view.prediction, view.learned_sigma, scale=denoiser.scale
    )
