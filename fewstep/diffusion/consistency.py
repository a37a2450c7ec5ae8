"""Consistency functions (Song et al. 2023, "Consistency Models", §3 and App. C): the
boundary-conditioned parameterisation f(x, t) = c_skip(t) x + c_out(t) x̂0(x, t) with
f(x, t_clean) = x, as LCM uses it (Luo et al. 2023, eq. 9). Used by consistency distillation,
its sampler and the exported LCM scheduler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fewstep.diffusion.denoiser import Denoised, Denoiser, batch_time
from fewstep.diffusion.schedules import NoiseProcess, broadcast


def lcm_boundary(
    t: Tensor, process: NoiseProcess, sigma_data: float = 0.5, timestep_scaling: float = 10.0
) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) = (σ_d² / (Δ² + σ_d²), Δ / sqrt(Δ² + σ_d²)), Δ = timestep_scaling ·
    (model_time(t) - model_time(t_clean)) (Song et al. 2023, eq. 7 / App. C; LCM's
    scaled form): c_skip = 1 and c_out = 0 exactly at t = t_clean."""
    t = t.to(torch.float64)
    clean = torch.full_like(t, process.t_clean)
    delta = timestep_scaling * (process.model_time(t) - process.model_time(clean))
    denom = delta**2 + sigma_data**2
    return sigma_data**2 / denom, delta / denom.sqrt()


@dataclass(eq=False)
class ConsistencyDenoiser(Denoiser):
    """The student as a consistency function f(x, t) = c_skip(t) x + c_out(t) x̂0_θ(x, t).

    boundary "lcm": c_skip, c_out of `lcm_boundary`. boundary "x0": c_skip = 0, c_out = 1, i.e.
    f = x̂0_θ; for a rectified flow with velocity prediction this is f(x, t) = x - t v_θ(x, t)
    (c_skip = 1, c_out = -t on v), exact at t = 0 with no scaling constant (likewise for ε/v
    prediction, since sigma(t_clean) = 0 and alpha(t_clean) = 1). Either way f(x, t_clean) = x.
    With `guidance` set (a w-conditioned student) it is passed to the network as the CFG scale
    unless the call gives ``guidance=`` itself. eps is re-derived from x = alpha f + sigma eps.
    """

    boundary: Literal["lcm", "x0"] = "lcm"
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    guidance: float | None = None

    def __call__(self, x: Tensor, t: Tensor | float, **cond: Tensor) -> Denoised:
        """The boundary-conditioned estimate (x0 = f(x, t), eps consistent with it)."""
        t = batch_time(t, x)
        if self.guidance is not None and "guidance" not in cond:
            cond["guidance"] = torch.full((x.shape[0],), self.guidance, device=x.device)
        d = super().__call__(x, t, **cond)
        x = x.to(d.x0.dtype)
        if self.boundary == "lcm":
            c_skip, c_out = lcm_boundary(t, self.process, self.sigma_data, self.timestep_scaling)
            x0 = broadcast(c_skip, x) * x + broadcast(c_out, x) * d.x0
        else:
            x0 = d.x0
        alpha, sigma = (broadcast(c, x) for c in self.process.alpha_sigma(t))
        eps = torch.where(sigma > 0, (x - alpha * x0) / sigma.clamp(min=1e-12), d.eps)
        return Denoised(x0, eps)
