"""Math invariants: parameterisation round trips, CFG, oracle samplers, timestep samplers, loss."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from torch import Tensor

from fewstep.diffusion import (
    ClassifierFreeGuidance,
    Denoised,
    Denoiser,
    DiscreteDDPM,
    LogitNormal,
    NoiseProcess,
    RectifiedFlow,
    Uniform,
    UniformDiscrete,
    batch_conditions,
    ddim_sample,
    ddpm_sample,
    diffusion_loss,
    dpmpp_2m_sample,
    euler_sample,
    from_x0_eps,
    heun_sample,
    min_snr_weights,
    shift_time,
    to_x0_eps,
)
from fewstep.diffusion.parameterization import PREDICTION_TYPES, PredictionType
from fewstep.diffusion.schedules import broadcast

PROCESSES = [DiscreteDDPM(), RectifiedFlow(), RectifiedFlow(shift=3.0)]
IDS = ["ddpm", "flow", "flow_shift3"]


def _interior_times(process: NoiseProcess, batch: int) -> Tensor:
    """Per-sample times strictly inside (t_clean, t_max)."""
    u = torch.linspace(0.02, 0.98, batch, dtype=torch.float64)
    return process.t_clean + u * (process.t_max - process.t_clean)


def _gauss(*shape: int, seed: int = 0) -> Tensor:
    """Seeded standard normal."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- processes and parameterisations -------------------------------------------------------


def test_ddpm_matches_diffusers_schedule() -> None:
    """alphas_cumprod and add_noise equal diffusers' DDPMScheduler for PixArt's linear betas."""
    process, ref = DiscreteDDPM(), DDPMScheduler(beta_schedule="linear")
    assert (process.alphas_cumprod.float() - ref.alphas_cumprod).abs().max() < 1e-6
    x0, eps, t = _gauss(4, 4, 8, 8), _gauss(4, 4, 8, 8, seed=1), torch.tensor([0, 10, 500, 999])
    ours = process.add_noise(x0, eps, t.double())
    assert (ours - ref.add_noise(x0, eps, t)).abs().max() < 1e-5
    v_ref = ref.get_velocity(x0, eps, t)
    alpha, sigma = process.alpha_sigma(t)
    v = from_x0_eps(x0, eps, broadcast(alpha, x0), broadcast(sigma, x0), "v")
    assert (v - v_ref).abs().max() < 1e-5


def test_ddpm_endpoints_and_interpolation() -> None:
    """t = -1 is the data; fractional t lies between its integer neighbours."""
    process = DiscreteDDPM()
    alpha, sigma = process.alpha_sigma(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    assert alpha[0] == 1.0 and sigma[0] == 0.0
    assert alpha[1] > alpha[2] > alpha[3] and sigma[1] < sigma[2] < sigma[3]
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("process", PROCESSES, ids=IDS)
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_parameterisation_round_trip(process: NoiseProcess, kind: PredictionType) -> None:
    """from_x0_eps then to_x0_eps recovers (x0, eps); converting via any kind is consistent."""
    x0, eps = _gauss(6, 3, 4, 4).double(), _gauss(6, 3, 4, 4, seed=1).double()
    alpha, sigma = process.alpha_sigma(_interior_times(process, 6))
    alpha, sigma = broadcast(alpha, x0), broadcast(sigma, x0)
    x_t = alpha * x0 + sigma * eps
    pred = from_x0_eps(x0, eps, alpha, sigma, kind)
    x0_hat, eps_hat = to_x0_eps(pred, x_t, alpha, sigma, kind)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    for other in PREDICTION_TYPES:
        via = from_x0_eps(*to_x0_eps(pred, x_t, alpha, sigma, kind), alpha, sigma, other)
        assert torch.allclose(via, from_x0_eps(x0, eps, alpha, sigma, other), atol=1e-9)


def test_flow_velocity_is_eps_minus_x0() -> None:
    """Rectified flow: x_t = (1 - t) x0 + t eps, velocity = d x_t / dt = eps - x0."""
    process, t = RectifiedFlow(), torch.tensor([0.3])
    x0, eps = _gauss(1, 2, 3), _gauss(1, 2, 3, seed=1)
    assert torch.allclose(process.add_noise(x0, eps, t), 0.7 * x0 + 0.3 * eps)
    assert torch.allclose(from_x0_eps(x0, eps, 0.7, 0.3, "velocity"), eps - x0)
    assert process.model_time(t).item() == pytest.approx(300.0)


def test_bad_choices_raise_clear_errors() -> None:
    """Unknown kinds/spacings and ODE samplers on a discrete process fail with a message."""
    with pytest.raises(ValueError, match="prediction must be one of"):
        from_x0_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "score")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="spacing"):
        RectifiedFlow().timesteps(4, "leading")
    with pytest.raises(ValueError, match="num_steps"):
        DiscreteDDPM().timesteps(0)
    with pytest.raises(NotImplementedError, match="use DDIM or DPM-Solver"):
        euler_sample(_Oracle(DiscreteDDPM(), _gauss(1, 2)), _gauss(1, 2), [999.0, -1.0])


# --- samplers with an oracle denoiser --------------------------------------------------------


class _Oracle:
    """The ideal denoiser for a single data point: x0 is exact, eps is what x_t implies."""

    def __init__(self, process: NoiseProcess, data: Tensor) -> None:
        self.process, self.data = process, data

    def __call__(self, x: Tensor, t: Tensor) -> Denoised:
        alpha, sigma = self.process.alpha_sigma(t)
        x0 = self.data.expand_as(x)
        return Denoised(x0, (x - float(alpha) * x0) / float(sigma))


SAMPLERS = {
    "ddim": lambda *a, **k: ddim_sample(*a, **k),
    "ddim_eta": lambda *a, **k: ddim_sample(*a, eta=0.7, **k),
    "ddpm": ddpm_sample,
    "dpmpp_2m": dpmpp_2m_sample,
    "euler": euler_sample,
    "heun": heun_sample,
}


ORACLE_CASES = [
    pytest.param(name, process, id=f"{name}-{pid}")
    for name in SAMPLERS
    for process, pid in zip(PROCESSES, IDS, strict=True)
    if not (name in ("euler", "heun") and isinstance(process, DiscreteDDPM))  # ODE: continuous t
]


@pytest.mark.parametrize(("name", "process"), ORACLE_CASES)
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_oracle_sampler_returns_the_data(name: str, process: NoiseProcess, steps: int) -> None:
    """Every sampler driven by the ideal denoiser of one data point ends exactly on it."""
    data, noise = _gauss(1, 4, 8, 8), _gauss(3, 4, 8, 8, seed=1)
    ts = process.timesteps(steps)
    out = SAMPLERS[name](_Oracle(process, data), noise, ts, generator=torch.Generator())
    assert (out - data).abs().max() < 1e-5


# --- classifier-free guidance ----------------------------------------------------------------


class _TextNet(torch.nn.Module):
    """x-dependent output plus a per-channel bias from the masked mean of text tokens, and
    garbage 'variance' channels (learned sigma, as PixArt)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.proj = torch.nn.Linear(16, 4)

    def forward(self, x: Tensor, t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        m = text_mask.float().unsqueeze(-1)  # [B, L] -> [B, L, 1]
        pooled = (text * m).sum(1) / m.sum(1).clamp(min=1)  # [B, D]
        bias = self.proj(pooled)[:, :, None, None]  # [B, 4] -> [B, 4, 1, 1]
        out = self.conv(x) * torch.cos(t / 500)[:, None, None, None]
        return out + torch.cat([bias, 10 * bias], 1)  # [B, 8, H, W]


def _cfg_setup() -> tuple[Denoiser, dict[str, Tensor], dict[str, Tensor], Tensor, Tensor]:
    """Denoiser, cond (B=3, L=5 with padding), uncond (B=1, L0=2), x and t."""
    den = Denoiser(_TextNet(), DiscreteDDPM(), "epsilon", learned_sigma=True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    cond = {"text": _gauss(3, 5, 16) * mask.unsqueeze(-1), "text_mask": mask}
    uncond = {"text": _gauss(1, 2, 16, seed=1), "text_mask": torch.ones(1, 2, dtype=torch.bool)}
    return den, cond, uncond, _gauss(3, 4, 8, 8, seed=2), torch.tensor([10.0, 500.0, 900.0])


def test_cfg_scale_one_is_the_conditional_prediction() -> None:
    """Guidance scale 1 equals the conditional prediction exactly."""
    den, cond, uncond, x, t = _cfg_setup()
    guided = ClassifierFreeGuidance(den, 1.0, cond, uncond)(x, t)
    plain = den.bind(**cond)(x, t)
    assert torch.equal(guided.x0, plain.x0) and torch.equal(guided.eps, plain.eps)


@pytest.mark.parametrize("scale", [0.0, 4.5])
def test_cfg_batched_combination(scale: float) -> None:
    """Batched cond+uncond (padded to a common text length) equals two separate passes."""
    den, cond, uncond, x, t = _cfg_setup()
    guided = ClassifierFreeGuidance(den, scale, cond, uncond)(x, t)
    c = den(x, t, **cond)
    u = den(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()})
    assert torch.allclose(guided.eps, u.eps + scale * (c.eps - u.eps), atol=1e-5)
    assert torch.allclose(guided.x0, u.x0 + scale * (c.x0 - u.x0), atol=1e-4)


def test_batch_conditions_pads_and_checks_keys() -> None:
    """Text pads with zeros and masks with False; mismatched keys fail clearly."""
    _, cond, uncond, _, _ = _cfg_setup()
    both = batch_conditions(cond, uncond)
    assert both["text"].shape == (6, 5, 16) and both["text_mask"].dtype == torch.bool
    assert not both["text_mask"][3:, 2:].any() and both["text"][3:, 2:].abs().sum() == 0
    with pytest.raises(ValueError, match="same condition keys"):
        batch_conditions(cond, {"text": uncond["text"]})


# --- training-time samplers and the loss -------------------------------------------------------


def test_timestep_samplers_ranges_and_shape() -> None:
    """Discrete times are integers in [0, 999]; continuous ones lie in [0, 1]."""
    gen = torch.Generator().manual_seed(0)
    t = UniformDiscrete()(20000, generator=gen)
    assert t.min() == 0 and t.max() == 999 and torch.equal(t, t.round())
    for sampler in (Uniform(), Uniform(shift=3.0), LogitNormal(), LogitNormal(0.5, 2.0, 2.0)):
        t = sampler(20000, generator=gen)
        assert t.shape == (20000,) and 0.0 <= t.min() and t.max() <= 1.0


def test_logit_normal_median_and_shift() -> None:
    """Logit-normal(0, 1) has median 0.5; shift > 1 moves mass towards noise (t -> 1)."""
    gen = torch.Generator().manual_seed(0)
    t = LogitNormal()(20000, generator=gen)
    assert abs(t.median().item() - 0.5) < 0.02
    shifted = LogitNormal(shift=3.0)(20000, generator=gen)
    assert shifted.median() > 0.7 and Uniform(shift=3.0)(20000, generator=gen).mean() > 0.6
    grid = torch.linspace(0, 1, 11)
    assert shift_time(grid, 3.0)[0] == 0 and shift_time(grid, 3.0)[-1] == 1
    assert (shift_time(grid, 3.0) >= grid).all() and torch.equal(shift_time(grid, 1.0), grid)


@pytest.mark.parametrize("process", PROCESSES[:2], ids=IDS[:2])
@pytest.mark.parametrize("kind", PREDICTION_TYPES)
def test_loss_zero_for_the_exact_target(process: NoiseProcess, kind: PredictionType) -> None:
    """The loss vanishes when the network outputs its target (learned-sigma channels ignored)."""
    x0, noise = _gauss(4, 4, 8, 8), _gauss(4, 4, 8, 8, seed=1)
    t = _interior_times(process, 4)

    def net(x: Tensor, model_t: Tensor) -> Tensor:
        alpha, sigma = process.alpha_sigma(t)
        target = from_x0_eps(x0, noise, broadcast(alpha, x0), broadcast(sigma, x0), kind)
        return torch.cat([target, torch.randn_like(target)], 1)  # [B, 2C, H, W]

    den = Denoiser(net, process, kind, learned_sigma=True)
    assert diffusion_loss(den, x0, noise, t).item() < 1e-10
    weights = min_snr_weights(*process.alpha_sigma(t), kind).float()
    assert diffusion_loss(den, x0, noise, t, weights=weights).item() < 1e-10
    wrong = Denoiser(lambda x, mt: torch.zeros(4, 8, 8, 8), process, kind, learned_sigma=True)
    assert diffusion_loss(wrong, x0, noise, t).item() > 0.1


def test_min_snr_weights_known_forms() -> None:
    """eps: min(SNR, g) / SNR; v on a VP process: min(SNR, g) / (SNR + 1)."""
    alpha, sigma = DiscreteDDPM().alpha_sigma(torch.tensor([10.0, 300.0, 900.0]))
    snr = (alpha / sigma) ** 2
    assert torch.allclose(min_snr_weights(alpha, sigma, "epsilon"), snr.clamp(max=5) / snr)
    assert torch.allclose(min_snr_weights(alpha, sigma, "v"), snr.clamp(max=5) / (snr + 1))
