"""Continuous-time consistency training in TrigFlow (sCM: Lu & Song 2024, §3-4 and Alg. 1) as
small pure functions: the proposal times, the tangent d f_θ⁻/dt of f_θ(x_t, t) = cos(t) x_t -
sin(t) sigma_d F_θ(x_t / sigma_d, t) by forward-mode AD (JVP) or central finite differences,
its warm-up and normalisation, and the adaptively weighted loss. F is any callable (x, t) -> F
in sigma_d units (`trigflow.TrigFlowDenoiser.velocity`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.diffusion.schedules import broadcast

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # (x_trig [B, ...], t [B] float64) -> F


def proposal_times(
    batch: int,
    p_mean: float,
    p_std: float,
    sigma_data: float,
    generator: torch.Generator,
    t_max: float,
) -> Tensor:
    """t = arctan(e^tau / sigma_d), tau ~ N(P_mean, P_std^2) (sCM §4.3, the EDM log-normal
    proposal in TrigFlow time), clamped to [0, t_max]; float64 [batch] on the generator's device."""
    tau = torch.randn(batch, generator=generator, device=generator.device, dtype=torch.float64)
    sigma = torch.exp(p_mean + p_std * tau)
    return torch.arctan(sigma / sigma_data).clamp(0.0, t_max)


def warmup_ratio(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H): the tangent warm-up weight of the second term (sCM §4.2, Alg. 1)."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def jvp_tangent(fn: VelocityFn, x: Tensor, t: Tensor, velocity: Tensor) -> tuple[Tensor, Tensor]:
    """(F(x, t), cos t sin t dF/dt) along dx/dt = velocity by `torch.func.jvp` with tangents
    (cos sin velocity, cos sin) (sCM Alg. 1 absorbs cos t sin t into the tangent). Attention runs
    on the math SDPA kernel: the fused CPU/CUDA kernels have no forward-mode derivative."""
    cs = torch.cos(t) * torch.sin(t)  # [B] float64
    with sdpa_kernel([SDPBackend.MATH]):
        out, tangent = torch.func.jvp(fn, (x, t), (broadcast(cs, velocity) * velocity, cs))
    return out, tangent


def finite_difference_tangent(
    fn: VelocityFn, x: Tensor, t: Tensor, velocity: Tensor, epsilon: float, t_max: float
) -> Tensor:
    """cos t sin t dF/dt by a central difference along the line x + (u - t) velocity, u = t ±
    epsilon (clamped to [0, t_max], then a secant): for kernels and sharded models without
    forward-mode AD. float32 with model time 1000 s wants epsilon ~ 1e-4 (truncation of the
    sinusoidal time embedding above, round-off below); bf16 is too coarse for it."""
    t_plus, t_minus = (t + epsilon).clamp(max=t_max), (t - epsilon).clamp(min=0.0)
    x_plus = x + broadcast(t_plus - t, velocity) * velocity
    x_minus = x + broadcast(t_minus - t, velocity) * velocity
    difference = fn(x_plus, t_plus) - fn(x_minus, t_minus)
    cs = torch.cos(t) * torch.sin(t) / (t_plus - t_minus)  # [B] float64
    return broadcast(cs, difference) * difference


def scm_tangent(
    f_minus: Tensor,
    dxt_dt: Tensor,
    x_t: Tensor,
    cs_df_dt: Tensor,
    t: Tensor,
    sigma_data: float,
    r: float = 1.0,
) -> Tensor:
    """g = -cos²(t) (sigma_d F⁻ - dx_t/dt) - r (cos(t) sin(t) x_t + sigma_d cos(t) sin(t) dF⁻/dt)
    = cos(t) d f_θ⁻/dt at r = 1 (sCM eq. 6-7 and Alg. 1; x_t and dx_t/dt in data units)."""
    cos, sin = (broadcast(c, x_t) for c in (torch.cos(t), torch.sin(t)))
    first = -cos * cos * (sigma_data * f_minus - dxt_dt)
    second = -(cos * sin * x_t + sigma_data * cs_df_dt)
    return first + r * second


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """g / (||g|| + c) with the per-sample RMS norm ||g||_2 / sqrt(D) (sCM §4.2, tangent
    normalisation; dimension-free as in the SANA-Sprint and FastGen code)."""
    rms = g.flatten(1).pow(2).mean(1).sqrt()  # [B]
    return g / (broadcast(rms, g) + c)


def adaptive_weighted_loss(squared_error: Tensor, w: Tensor) -> Tensor:
    """Per sample e^{w(t)} / D ||·||² - w(t) with squared_error = ||·||² / D [B] (sCM eq. 8); its
    minimiser over w is w = -log(squared_error), which equalises the loss across times."""
    return torch.exp(w) * squared_error - w
