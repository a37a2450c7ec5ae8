"""Sampler parity with diffusers schedulers on a tiny deterministic model, plus Sampler objects."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from fewstep.diffusion import (
    DDIM,
    DDPM,
    Denoiser,
    DiscreteDDPM,
    DPMSolver2M,
    Euler,
    Heun,
    NoiseProcess,
    RectifiedFlow,
    Sampler,
    ddim_sample,
    ddpm_sample,
    dpmpp_2m_sample,
    euler_sample,
    from_x0_eps,
    heun_sample,
)
from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.schedules import broadcast

TOL = 1e-4
PIXART_BETAS = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
)
DIFFUSERS_KIND = {"epsilon": "epsilon", "v": "v_prediction"}


class TinyNet(nn.Module):
    """Exact posterior mean for Gaussian data N(mu, s^2) plus a fixed random conv perturbation,
    emitted in the requested parameterisation; bounded outputs keep fp32 parity meaningful."""

    def __init__(
        self, process: NoiseProcess, kind: PredictionType, to_time: Callable[[Tensor], Tensor]
    ) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.process, self.kind, self.to_time = process, kind, to_time
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
        self.mu = 0.5 * torch.randn(1, 4, 1, 1, generator=gen)
        self.std = 0.8

    @torch.no_grad()
    def forward(self, x: Tensor, model_t: Tensor) -> Tensor:
        """Prediction of kind `self.kind` at x [B, 4, H, W] and network time [B]."""
        alpha, sigma = self.process.alpha_sigma(self.to_time(model_t.double()))
        alpha, sigma = broadcast(alpha, x), broadcast(sigma, x)
        s2 = self.std**2
        x0 = self.mu + alpha * s2 * (x - alpha * self.mu) / (alpha**2 * s2 + sigma**2)
        x0 = x0 + 0.1 * torch.tanh(self.conv(x) + torch.sin(broadcast(model_t, x) / 100.0))
        eps = (x - alpha * x0) / sigma
        return from_x0_eps(x0, eps, alpha, sigma, self.kind)


def _noise(seed: int = 1) -> Tensor:
    """Starting noise [2, 4, 8, 8]."""
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(sched, net: nn.Module, noise: Tensor, **step_kwargs) -> Tensor:
    """The standard diffusers pipeline loop: model(x, t) then scheduler.step."""
    x = noise.clone()
    for t in sched.timesteps:
        out = net(x, t.float().expand(x.shape[0]))
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    return x


def _max_err(a: Tensor, b: Tensor) -> float:
    """Max absolute difference."""
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("kind", ["epsilon", "v"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_matches_diffusers(spacing: str, kind: PredictionType) -> None:
    """Deterministic DDIM equals DDIMScheduler (set_alpha_to_one=False -> final time 0)."""
    process = DiscreteDDPM()
    net = TinyNet(process, kind, lambda t: t)
    sched = DDIMScheduler(
        **PIXART_BETAS,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_KIND[kind],
    )
    sched.set_timesteps(10)
    ts = process.timesteps(10, spacing, final=0.0)
    assert torch.equal(ts[:-1].long(), sched.timesteps)
    ours = ddim_sample(Denoiser(net, process, kind), _noise(), ts)
    assert _max_err(ours, _diffusers_loop(sched, net, _noise())) < TOL


@pytest.mark.parametrize("steps", [7, 10, 25])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm_timestep_grid_matches_diffusers(spacing: str, steps: int) -> None:
    """Our grids equal DDIMScheduler.timesteps. (Its step() always moves t -> t - T // N, which
    leaves this grid for 'linspace' or N not dividing T; ours steps to the next grid time.)"""
    sched = DDIMScheduler(**PIXART_BETAS, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    assert torch.equal(DiscreteDDPM().timesteps(steps, spacing)[:-1].long(), sched.timesteps)


def test_ddim_eta_matches_diffusers() -> None:
    """Stochastic DDIM (eta = 1) draws the same noise in the same order as DDIMScheduler."""
    process = DiscreteDDPM()
    net = TinyNet(process, "epsilon", lambda t: t)
    sched = DDIMScheduler(**PIXART_BETAS, clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(10)
    ref = _diffusers_loop(sched, net, _noise(), eta=1.0, generator=torch.Generator().manual_seed(3))
    ours = ddim_sample(
        Denoiser(net, process),
        _noise(),
        process.timesteps(10, "leading"),
        eta=1.0,
        generator=torch.Generator().manual_seed(3),
    )
    assert _max_err(ours, ref) < TOL


def test_ddpm_matches_diffusers() -> None:
    """Ancestral DDPM on strided timesteps equals DDPMScheduler (fixed_small variance)."""
    process = DiscreteDDPM()
    net = TinyNet(process, "epsilon", lambda t: t)
    sched = DDPMScheduler(**PIXART_BETAS, clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(10)
    ref = _diffusers_loop(sched, net, _noise(), generator=torch.Generator().manual_seed(4))
    ts = process.timesteps(10, "leading")
    ours = ddpm_sample(
        Denoiser(net, process), _noise(), ts, generator=torch.Generator().manual_seed(4)
    )
    assert _max_err(ours, ref) < TOL


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize(
    ("kind", "spacing", "steps", "final_sigmas_type"),
    [
        ("epsilon", "linspace", 10, "zero"),  # PixArt-Sigma's shipped scheduler config
        ("epsilon", "linspace", 20, "zero"),
        ("epsilon", "trailing", 8, "zero"),
        ("v", "linspace", 10, "zero"),
        ("epsilon", "linspace", 20, "sigma_min"),  # 2nd-order final step
    ],
)
def test_dpmpp_2m_matches_diffusers(
    kind: PredictionType, spacing: str, steps: int, final_sigmas_type: str
) -> None:
    """DPM-Solver++(2M) equals DPMSolverMultistepScheduler(dpmsolver++, order 2)."""
    process = DiscreteDDPM()
    net = TinyNet(process, kind, lambda t: t)
    sched = DPMSolverMultistepScheduler(
        **PIXART_BETAS,
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing=spacing,
        prediction_type=DIFFUSERS_KIND[kind],
        final_sigmas_type=final_sigmas_type,
    )
    sched.set_timesteps(steps)
    if spacing == "trailing":
        assert torch.equal(process.timesteps(steps, "trailing")[:-1].long(), sched.timesteps)
    final = process.t_clean if final_sigmas_type == "zero" else 0.0
    ts = torch.cat([sched.timesteps.double(), torch.tensor([final], dtype=torch.float64)])
    ours = dpmpp_2m_sample(Denoiser(net, process, kind), _noise(), ts)
    assert _max_err(ours, _diffusers_loop(sched, net, _noise())) < TOL


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_matches_diffusers(shift: float) -> None:
    """Flow Euler equals FlowMatchEulerDiscreteScheduler, timesteps included."""
    process = RectifiedFlow(shift=shift)
    net = TinyNet(process, "velocity", lambda t: t / 1000.0)
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(12)
    ts = process.timesteps(12, "linspace")
    assert _max_err(ts, sched.sigmas) < 1e-6
    ours = euler_sample(Denoiser(net, process, "velocity"), _noise(), ts)
    assert _max_err(ours, _diffusers_loop(sched, net, _noise())) < TOL


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_heun_matches_diffusers(shift: float) -> None:
    """Flow Heun equals FlowMatchHeunDiscreteScheduler (Euler on the last step)."""
    process = RectifiedFlow(shift=shift)
    net = TinyNet(process, "velocity", lambda t: t / 1000.0)
    sched = FlowMatchHeunDiscreteScheduler(shift=shift)
    sched.set_timesteps(6)
    ts = process.timesteps(6, "linspace")
    ours = heun_sample(Denoiser(net, process, "velocity"), _noise(), ts)
    assert _max_err(ours, _diffusers_loop(sched, net, _noise())) < TOL


class _Counting:
    """Counts calls to a sampler-facing denoiser."""

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser, self.process, self.calls = denoiser, denoiser.process, 0

    def __call__(self, x: Tensor, t: Tensor):
        self.calls += 1
        return self.denoiser(x, t)


@pytest.mark.parametrize(
    ("sampler", "process"),
    [
        (DDIM(steps=4), DiscreteDDPM()),
        (DDIM(steps=3, eta=0.5, spacing="leading"), DiscreteDDPM()),
        (DDPM(steps=5), DiscreteDDPM()),
        (DPMSolver2M(steps=4), DiscreteDDPM()),
        (DDIM(steps=2), RectifiedFlow()),
        (Euler(steps=4), RectifiedFlow(shift=3.0)),
        (Heun(steps=4), RectifiedFlow()),
        (Heun(steps=1), RectifiedFlow()),
    ],
)
def test_sampler_objects_nfe(sampler: Sampler, process: NoiseProcess) -> None:
    """Sampler objects walk steps + 1 times, call the denoiser nfe times, return finite samples."""
    kind = "velocity" if isinstance(process, RectifiedFlow) else "epsilon"
    to_time = (lambda t: t / 1000.0) if kind == "velocity" else (lambda t: t)
    counting = _Counting(Denoiser(TinyNet(process, kind, to_time), process, kind))
    assert len(sampler.timesteps(process)) == sampler.steps + 1
    out = sampler(counting, _noise(), generator=torch.Generator().manual_seed(0))
    assert counting.calls == sampler.nfe
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()


def test_sampler_built_by_jsonargparse() -> None:
    """LightningCLI-style class_path/init_args builds a Sampler."""
    parser = ArgumentParser()
    parser.add_argument("--sampler", type=Sampler)
    cfg = parser.parse_object(
        {"sampler": {"class_path": "fewstep.diffusion.DDIM", "init_args": {"steps": 4}}}
    )
    sampler = parser.instantiate(cfg).sampler
    assert isinstance(sampler, DDIM) and sampler.steps == 4 and sampler.nfe == 4
