"""Samplers as pure functions (denoiser, noise, timesteps, options) -> sample, plus small
LightningCLI-buildable Sampler objects that fix the step count and spacing.

`timesteps` holds N + 1 descending process times: the denoiser is evaluated at the first N and
sampling ends at the last (usually process.t_clean). `noise` is the state at timesteps[0]
(diffusers' convention, init_noise_sigma = 1). The state is kept in at least float32.
"""

from __future__ import annotations

import copy
import math
from abc import ABC
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoised, SamplerDenoiser
from fewstep.diffusion.schedules import NoiseProcess, Spacing, broadcast

Timesteps = Tensor | Sequence[float]


def _times(timesteps: Timesteps) -> list[float]:
    """Process times as Python floats (float64), checked to be N + 1 >= 2 long."""
    ts = [float(t) for t in timesteps]
    if len(ts) < 2:
        raise ValueError(f"timesteps needs N + 1 >= 2 entries (N steps and the end), got {ts}")
    return ts


def _coefs(process: NoiseProcess, t: float) -> tuple[float, float]:
    """(alpha, sigma) at one time as floats."""
    alpha, sigma = process.alpha_sigma(t)
    return float(alpha), float(sigma)


def _state(noise: Tensor) -> Tensor:
    """The sampling state: noise upcast to at least float32."""
    return noise.to(torch.promote_types(noise.dtype, torch.float32))


def ddim_step(
    d: Denoised,
    coefs_t: tuple[float, float],
    coefs_s: tuple[float, float],
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z, t -> s < t (Song et al. 2021, eq. 12);
    c = eta * the DDPM posterior std (eq. 16, generalised beyond VP)."""
    (a_t, s_t), (a_s, s_s) = coefs_t, coefs_s
    c2 = eta**2 * (s_s / s_t) ** 2 * max(s_t**2 - (a_t * s_s / a_s) ** 2, 0.0) if s_s > 0 else 0.0
    x = a_s * d.x0 + math.sqrt(max(s_s**2 - c2, 0.0)) * d.eps
    if c2 > 0:
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + math.sqrt(c2) * z
    return x


def ddim_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12); eta = 0 is deterministic, eta = 1 is ancestral DDPM."""
    ts, x = _times(timesteps), _state(noise)
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        d = denoiser(x, torch.tensor(t))
        x = ddim_step(d, _coefs(denoiser.process, t), _coefs(denoiser.process, s), eta, generator)
    return x.to(noise.dtype)


def ddpm_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Ancestral DDPM with posterior variance (Ho et al. 2020, Alg. 2 / eq. 7) = DDIM at eta = 1
    (Song et al. 2021, §4.1); strided timesteps allowed."""
    return ddim_sample(denoiser, noise, timesteps, eta=1.0, generator=generator)


def dpmpp_2m_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    lower_order_final: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DPM-Solver++(2M) on the data prediction (Lu et al. 2022b, Alg. 2). First order on the first
    step, and on the last if it ends at sigma = 0 or (lower_order_final and N < 15): diffusers'."""
    ts, x = _times(timesteps), _state(noise)
    n = len(ts) - 1
    prev_x0, prev_h = None, None
    for i, (t, s) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        (a_t, s_t), (a_s, s_s) = _coefs(denoiser.process, t), _coefs(denoiser.process, s)
        x0 = denoiser(x, torch.tensor(t)).x0
        exp_neg_h = (s_s * a_t) / (a_s * s_t)  # e^{-h}, h = lambda_s - lambda_t, lambda = log a/s
        h = -math.log(exp_neg_h) if exp_neg_h > 0 else math.inf
        last_first_order = i == n - 1 and (s_s == 0 or (lower_order_final and n < 15))
        if prev_x0 is None or last_first_order:
            d = x0
        else:
            r = prev_h / h
            d = x0 + (x0 - prev_x0) / (2.0 * r)  # (1 + 1/2r) D_i - 1/2r D_{i-1}
        x = (s_s / s_t) * x + a_s * (1.0 - exp_neg_h) * d
        prev_x0, prev_h = x0, h
    return x.to(noise.dtype)


def _velocity(denoiser: SamplerDenoiser, x: Tensor, t: float) -> Tensor:
    """ODE drift dx/dt = alpha'(t) x0 + sigma'(t) eps (rectified flow: eps - x0)."""
    d = denoiser(x, torch.tensor(t))
    d_alpha, d_sigma = denoiser.process.alpha_sigma_derivative(t)
    return float(d_alpha) * d.x0 + float(d_sigma) * d.eps


def ddim_deterministic_step(d: Denoised, s: Tensor | float, process: NoiseProcess) -> Tensor:
    """Deterministic DDIM step to time s (a scalar or per-sample [B]): x_s = alpha_s x̂0 +
    sigma_s ε̂ (Song et al. 2021, eq. 12 at eta = 0); LCM's and progressive distillation's
    teacher solver for any process."""
    alpha, sigma = process.alpha_sigma(s)
    return broadcast(alpha, d.x0) * d.x0 + broadcast(sigma, d.x0) * d.eps


def euler_step(
    d: Denoised, x: Tensor, t: Tensor | float, s: Tensor | float, process: NoiseProcess
) -> Tensor:
    """One Euler step of the probability-flow ODE from t to s (scalars or per-sample [B]):
    x_s = x_t + (s - t) v, v = alpha'(t) x̂0 + sigma'(t) ε̂ (rectified flow: ε̂ - x̂0; Liu et al.
    2022, eq. 1)."""
    d_alpha, d_sigma = process.alpha_sigma_derivative(t)
    x = x.to(d.x0.dtype)
    v = broadcast(d_alpha, x) * d.x0 + broadcast(d_sigma, x) * d.eps
    delta = torch.as_tensor(s, dtype=torch.float64) - torch.as_tensor(t, dtype=torch.float64)
    return x + broadcast(delta, x) * v


def euler_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Euler's method on the flow ODE dx/dt = v(x, t) (Liu et al. 2022; Esser et al. 2024)."""
    ts, x = _times(timesteps), _state(noise)
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        x = euler_step(denoiser(x, torch.tensor(t)), x, t, s, denoiser.process)
    return x.to(noise.dtype)


def heun_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn); a step ending at
    sigma = 0 is plain Euler, so N steps cost 2N - 1 evaluations."""
    ts, x = _times(timesteps), _state(noise)
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        v = _velocity(denoiser, x, t)
        x_euler = x + (s - t) * v
        if _coefs(denoiser.process, s)[1] == 0.0:
            x = x_euler
        else:
            x = x + (s - t) * 0.5 * (v + _velocity(denoiser, x_euler, s))
    return x.to(noise.dtype)


def consistency_sample(
    denoiser: SamplerDenoiser,
    noise: Tensor,
    timesteps: Timesteps,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; LCM, Luo et al. 2023, Alg. 3):
    x0 = f(x_{t_i}, t_i), then x_{t_{i+1}} = alpha x0 + sigma z with fresh z ~ N(0, I); the end
    (t_clean: alpha = 1, sigma = 0) returns the last x0 exactly."""
    ts, x = _times(timesteps), _state(noise)
    for t, s in zip(ts[:-1], ts[1:], strict=True):
        x0 = denoiser(x, torch.tensor(t)).x0.to(x.dtype)
        a_s, s_s = _coefs(denoiser.process, s)
        x = a_s * x0
        if s_s > 0:
            z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + s_s * z
    return x.to(noise.dtype)


class Sampler(ABC):
    """A sampler with its step count and spacing fixed; the process comes from the denoiser, so
    teacher and student go through the same code. `nfe` counts denoiser calls per sample: a
    ClassifierFreeGuidance denoiser batches cond + uncond, so a guided call still counts 1.

    `timesteps` (optional) gives the N process times the denoiser is evaluated at explicitly
    (e.g. LCM's [999, 759, 499, 259]); it overrides `steps` (set to N) and `spacing`, and sampling
    ends at process.t_clean. A later `steps = n < N` walks an even subset of them (as LCM's
    scheduler picks from its origin schedule: entries i * N // n).

    A subclass names its sampling function (``sample_fn``) and the settings it passes on
    (``options``: attribute names, "generator" for the re-noising RNG)."""

    sample_fn: ClassVar[Callable[..., Tensor]]
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        steps: int = 20,
        spacing: Spacing = "trailing",
        timesteps: list[float] | None = None,
    ) -> None:
        self.custom_timesteps = _custom_times(timesteps)
        self.steps = steps if self.custom_timesteps is None else len(self.custom_timesteps)
        self.spacing = spacing

    def timesteps(self, process: NoiseProcess) -> Tensor:
        """The N + 1 process times this sampler walks."""
        if self.custom_timesteps is None:
            return process.timesteps(self.steps, self.spacing)
        ts, n = self.custom_timesteps, self.steps
        if not 1 <= n <= len(ts):
            raise ValueError(
                f"{type(self).__name__}: steps={n} but the explicit timesteps {ts} have "
                f"{len(ts)} entries; use at most {len(ts)} steps or other timesteps."
            )
        chosen = [ts[i * len(ts) // n] for i in range(n)]
        if not (process.t_clean < chosen[-1] and chosen[0] <= process.t_max):
            raise ValueError(
                f"{type(self).__name__}: timesteps {ts} must lie in ({process.t_clean}, "
                f"{process.t_max}] for {type(process).__name__}"
            )
        return torch.tensor([*chosen, process.t_clean], dtype=torch.float64)

    def with_steps(self, steps: int) -> Sampler:
        """A copy walking `steps` steps (a subset of explicit timesteps, if any)."""
        sampler = copy.copy(self)
        sampler.steps = steps
        return sampler

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per sample."""
        return self.steps

    def init_args(self) -> dict[str, object]:
        """The constructor arguments that rebuild this sampler (for configs and checkpoints)."""
        args = {k: v for k, v in vars(self).items() if k != "custom_timesteps"}
        if self.custom_timesteps is not None:
            args["timesteps"] = list(self.custom_timesteps)
        return args

    def __call__(
        self,
        denoiser: SamplerDenoiser,
        noise: Tensor,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample from `noise` (the state at the first timestep)."""
        return self.sample(denoiser, noise, self.timesteps(denoiser.process), generator)

    def sample(
        self,
        denoiser: SamplerDenoiser,
        noise: Tensor,
        timesteps: Timesteps,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Run the class's sampling function on explicit timesteps with its ``options`` (the
        settings it takes; "generator" passes the re-noising RNG)."""
        values = {**vars(self), "generator": generator}
        return type(self).sample_fn(
            denoiser, noise, timesteps, **{k: values[k] for k in self.options}
        )

    def __repr__(self) -> str:
        """Class name and settings, for logs and reports."""
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_args().items())
        return f"{type(self).__name__}({args})"


def _custom_times(timesteps: Sequence[float] | None) -> list[float] | None:
    """Explicit sampler timesteps as floats, checked to be non-empty and strictly descending."""
    if timesteps is None:
        return None
    ts = [float(t) for t in timesteps]
    if not ts or any(a <= b for a, b in zip(ts[:-1], ts[1:], strict=False)):
        raise ValueError(f"Sampler timesteps must be non-empty and strictly descending, got {ts}")
    return ts


class DDIM(Sampler):
    """DDIM sampler (Song et al. 2021); see ddim_sample."""

    sample_fn = staticmethod(ddim_sample)
    options = ("eta", "generator")

    def __init__(
        self,
        steps: int = 20,
        eta: float = 0.0,
        spacing: Spacing = "trailing",
        timesteps: list[float] | None = None,
    ) -> None:
        super().__init__(steps, spacing, timesteps)
        self.eta = eta


class DDPM(Sampler):
    """Ancestral DDPM sampler (Ho et al. 2020); see ddpm_sample."""

    sample_fn = staticmethod(ddpm_sample)
    options = ("generator",)


class DPMSolver2M(Sampler):
    """DPM-Solver++(2M) sampler (Lu et al. 2022b); see dpmpp_2m_sample."""

    sample_fn = staticmethod(dpmpp_2m_sample)
    options = ("lower_order_final",)

    def __init__(
        self,
        steps: int = 20,
        spacing: Spacing = "trailing",
        lower_order_final: bool = True,
        timesteps: list[float] | None = None,
    ) -> None:
        super().__init__(steps, spacing, timesteps)
        self.lower_order_final = lower_order_final


class Euler(Sampler):
    """Flow-ODE Euler sampler; see euler_sample."""

    sample_fn = staticmethod(euler_sample)


class Heun(Sampler):
    """Flow-ODE Heun sampler; see heun_sample. nfe = 2 * steps - 1."""

    sample_fn = staticmethod(heun_sample)

    @property
    def nfe(self) -> int:
        """Two evaluations per step, one on the final step to sigma = 0."""
        return 2 * self.steps - 1


class Consistency(Sampler):
    """Multistep consistency sampler (Song et al. 2023; LCM); see consistency_sample. Pass a
    generator for reproducible re-noising."""

    sample_fn = staticmethod(consistency_sample)
    options = ("generator",)
