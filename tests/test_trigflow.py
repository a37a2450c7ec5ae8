"""TrigFlow (sCM; SANA-Sprint §3.1): exact (x_t, time, prediction) conversions from rectified-flow
and DDPM teachers and back (float64), SANA-Sprint's closed forms, the analytic PF-ODE velocity of
Gaussian data, and consistency sampling in TrigFlow time equal to sampling in the teacher's time."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from fewstep.diffusion import Consistency, Denoiser, DiscreteDDPM, RectifiedFlow
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.schedules import NoiseProcess, broadcast
from fewstep.diffusion.trigflow import (
    TrigFlowDenoiser,
    TrigFlowTime,
    base_time,
    from_trig_prediction,
    from_trigflow,
    to_trig_prediction,
    to_trigflow,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TIGHT = {"rtol": 1e-12, "atol": 1e-12}
SHAPE = (5, 3, 4, 4)


def randn(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_rectified_flow_conversion_is_sana_sprints_closed_form():
    s = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.97], dtype=torch.float64)
    x, u = randn(*SHAPE), randn(*SHAPE, seed=1)
    flow = RectifiedFlow()
    x_trig, t = to_trigflow(flow, x, s)
    norm = torch.sqrt(s**2 + (1 - s) ** 2).view(-1, 1, 1, 1)
    torch.testing.assert_close(t, torch.arctan(s / (1 - s)), **TIGHT)
    torch.testing.assert_close(x_trig, x / norm, **TIGHT)
    # SANA-Sprint eq. 5: F = ((1 - 2s) x + (1 - 2s + 2s²) u) / sqrt(s² + (1 - s)²)
    s4 = s.view(-1, 1, 1, 1)
    sana = ((1 - 2 * s4) * x + (1 - 2 * s4 + 2 * s4**2) * u) / norm
    torch.testing.assert_close(to_trig_prediction(u, x, s, flow, "velocity"), sana, **TIGHT)


def test_vp_ddpm_is_trigflow_up_to_the_time_change():
    ddpm = DiscreteDDPM()
    t = torch.tensor([0.0, 10.0, 250.5, 600.0, 999.0], dtype=torch.float64)
    x = randn(*SHAPE)
    x_trig, t_trig = to_trigflow(ddpm, x, t)
    abar = torch.exp(2 * torch.log(ddpm.alpha_sigma(t)[0]))
    torch.testing.assert_close(t_trig, torch.arctan(torch.sqrt((1 - abar) / abar)), **TIGHT)
    torch.testing.assert_close(x_trig, x, rtol=1e-15, atol=1e-15)  # sqrt(abar + 1 - abar) = 1


CASES = [
    (RectifiedFlow(), "velocity", [0.02, 0.25, 0.5, 0.8, 0.999]),
    (DiscreteDDPM(), "epsilon", [0.0, 17.0, 333.25, 700.0, 999.0]),
    (DiscreteDDPM(), "v", [1.0, 100.0, 500.0, 900.5, 998.0]),
    (RectifiedFlow(), "x0", [0.1, 0.2, 0.4, 0.6, 0.9]),
]


@pytest.mark.parametrize(("process", "kind", "times"), CASES)
def test_round_trips_of_state_time_and_prediction_are_exact(process, kind, times):
    t = torch.tensor(times, dtype=torch.float64)
    x, pred = randn(*SHAPE), randn(*SHAPE, seed=1)
    x_trig, t_trig = to_trigflow(process, x, t)
    x_back, t_back = from_trigflow(process, x_trig, t_trig)
    torch.testing.assert_close(t_back, t, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(x_back, x, **TIGHT)
    velocity = to_trig_prediction(pred, x, t, process, kind)
    back = from_trig_prediction(velocity, x_trig, t_trig, process, kind)
    torch.testing.assert_close(back, pred, rtol=1e-10, atol=1e-10)
    # and TrigFlow -> process -> TrigFlow from the TrigFlow side
    f_trig = randn(*SHAPE, seed=2)
    pred2 = from_trig_prediction(f_trig, x_trig, t_trig, process, kind)
    torch.testing.assert_close(to_trig_prediction(pred2, x, t, process, kind), f_trig, **TIGHT)


def test_trigflow_time_process_grid_and_model_time():
    flow = TrigFlowTime(RectifiedFlow())
    assert flow.t_clean == 0.0 and flow.t_max == math.pi / 2
    torch.testing.assert_close(
        flow.timesteps(2), torch.tensor([math.pi / 2, math.pi / 4, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(flow.timesteps(4)[1], torch.tensor(math.atan(3.0)).double())
    torch.testing.assert_close(
        flow.model_time(torch.tensor([math.pi / 4])).float(), torch.tensor([500.0])
    )
    alpha, sigma = flow.alpha_sigma(0.3)
    assert float(alpha) == math.cos(0.3) and float(sigma) == math.sin(0.3)
    ddpm = TrigFlowTime(DiscreteDDPM())
    assert ddpm.timesteps(2)[-1] == 0.0 and ddpm.t_max < math.pi / 2
    torch.testing.assert_close(
        base_time(ddpm.base, ddpm.timesteps(2)[:-1]).float(), ddpm.base.timesteps(2)[:-1].float()
    )


class GaussianOracle(nn.Module):
    """The exact denoiser of data x0 ~ N(mu, s0²) (per element) on ``process``, emitting the
    prediction ``kind``: E[x0 | x_t] = mu + alpha s0² (x_t - alpha mu) / (alpha² s0² + sigma²)."""

    def __init__(self, process: NoiseProcess, kind: str, mu: Tensor, s0: Tensor) -> None:
        super().__init__()
        self.process, self.kind, self.mu, self.s0 = process, kind, mu, s0

    def forward(self, x: Tensor, model_t: Tensor, **cond: Tensor) -> Tensor:
        t = model_t.double() / (1000.0 if isinstance(self.process, RectifiedFlow) else 1.0)
        alpha, sigma = (broadcast(c, x) for c in self.process.alpha_sigma(t))
        x0 = self.mu + alpha * self.s0**2 * (x - alpha * self.mu) / (
            alpha**2 * self.s0**2 + sigma**2
        )
        eps = (x - alpha * x0) / sigma
        return from_x0_eps(x0, eps, alpha, sigma, self.kind)


@pytest.mark.parametrize(
    ("process", "kind"), [(RectifiedFlow(), "velocity"), (DiscreteDDPM(), "epsilon")]
)
def test_converted_teacher_velocity_is_the_analytic_trigflow_pf_ode(process, kind):
    mu, s0 = randn(1, 3, 4, 4, seed=3), 0.2 + randn(1, 3, 4, 4, seed=4).abs()
    teacher = TrigFlowDenoiser.wrap(Denoiser(GaussianOracle(process, kind, mu, s0), process, kind))
    t = torch.tensor([0.1, 0.5, 0.8, 1.2, 1.5], dtype=torch.float64)
    x = randn(*SHAPE, seed=5)
    # the PF-ODE keeps xi = (x - cos(t) mu) / m(t) fixed, m² = cos² s0² + sin² (the marginal std)
    cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    m = torch.sqrt(cos**2 * s0**2 + sin**2)
    xi = (x - cos * mu) / m
    analytic = -sin * mu + sin * cos * (1 - s0**2) / m * xi
    torch.testing.assert_close(teacher.velocity(x, t), analytic, rtol=1e-9, atol=1e-9)


def test_ddpm_view_past_t_max_keeps_x0_and_the_trigflow_identity():
    process = DiscreteDDPM()
    mu, s0 = randn(1, 3, 4, 4, seed=3), torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    teacher = TrigFlowDenoiser.wrap(
        Denoiser(GaussianOracle(process, "epsilon", mu, s0), process, "epsilon")
    )
    t = torch.full((5,), math.pi / 2, dtype=torch.float64)
    x = randn(*SHAPE, seed=6)
    d = teacher(x, t)
    cos, sin = math.cos(math.pi / 2), 1.0
    torch.testing.assert_close(cos * d.x0 + sin * d.eps, x, **TIGHT)
    assert torch.isfinite(d.x0).all()


def test_consistency_sampling_in_trigflow_time_equals_the_teachers_frame():
    process = RectifiedFlow()
    mu, s0 = randn(1, 3, 4, 4, seed=3), torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    base = Denoiser(GaussianOracle(process, "velocity", mu, s0), process, "velocity")
    trig = TrigFlowDenoiser.wrap(base)
    noise = randn(*SHAPE, seed=7)
    for steps in (1, 2, 4):
        a = Consistency(steps=steps)(trig.bind(), noise, torch.Generator().manual_seed(0))
        b = Consistency(steps=steps)(base.bind(), noise, torch.Generator().manual_seed(0))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # Denoiser.raw: float32 model time
