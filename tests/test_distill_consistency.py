"""Latent consistency distillation: math invariants (loss, boundary condition, teacher solver step,
guidance fold, EMA target), the multistep consistency sampler, and a tiny CPU run via the CLI."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from student_fixtures import build_tiny_teacher, cpu_student_config
from torch import Tensor, nn

from fewstep.cli import run
from fewstep.diffusion import (
    ClassifierFreeGuidance,
    Consistency,
    Denoised,
    Denoiser,
    DiscreteDDPM,
    Euler,
    RectifiedFlow,
)
from fewstep.diffusion.consistency import lcm_boundary
from fewstep.diffusion.samplers import ddim_deterministic_step, euler_step
from fewstep.distill import DistillBatch, Models
from fewstep.distill.consistency import (
    ConsistencyDistillation,
    consistency_loss,
    skipping_schedule,
)
from fewstep.models.dit import DiT

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[1] / "configs"
TEXT_DIM = 16


def tiny_dit(**kwargs) -> DiT:
    """A 1-block DiT on 4x8x8 latents with every weight random (text matters)."""
    torch.manual_seed(0)
    net = DiT(
        in_channels=4,
        patch_size=2,
        hidden_size=32,
        depth=1,
        num_heads=2,
        caption_channels=TEXT_DIM,
        learn_sigma=False,
        sample_size=8,
        **kwargs,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.1)
    return net.eval()


def conditions(b: int = 3) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    g = torch.Generator().manual_seed(1)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3, [True] + [False] * 4])[:b]
    cond = {"text": torch.randn(b, 5, TEXT_DIM, generator=g), "text_mask": mask}
    uncond = {
        "text": torch.randn(b, 2, TEXT_DIM, generator=g),
        "text_mask": torch.ones(b, 2, dtype=torch.bool),
    }
    return cond, uncond


def batch(b: int = 3, latents: Tensor | None = None) -> DistillBatch:
    cond, uncond = conditions(b)
    x0 = latents if latents is not None else torch.randn(b, 4, 8, 8)
    return DistillBatch(
        x0,
        cond["text"],
        cond["text_mask"],
        uncond["text"],
        uncond["text_mask"],
        torch.Generator().manual_seed(0),
    )


CASES = [(DiscreteDDPM(), "epsilon"), (RectifiedFlow(), "velocity")]


@pytest.mark.parametrize("kind", ["huber", "l2"])
def test_consistency_loss_is_zero_exactly_when_equal(kind):
    a = torch.randn(2, 4, 8, 8)
    assert consistency_loss(a, a.clone(), kind).item() == 0.0
    assert consistency_loss(a, a + 1e-2, kind).item() > 0.0


@pytest.mark.parametrize("boundary", ["lcm", "x0"])
@pytest.mark.parametrize(("process", "prediction"), CASES)
def test_boundary_condition_is_the_identity_at_t_clean(process, prediction, boundary):
    method = ConsistencyDistillation(boundary=boundary)
    f = method.consistency_function(Denoiser(tiny_dit(), process, prediction))
    cond, _ = conditions()
    x = torch.randn(3, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(f(x, process.t_clean, **cond).x0, x)
        far = f(x, process.t_max, **cond).x0
    assert not torch.allclose(far, x)
    c_skip, c_out = lcm_boundary(torch.tensor([process.t_clean, process.t_max]), process)
    assert c_skip.tolist()[0] == 1.0 and c_out.tolist()[0] == 0.0 and c_skip[1] < 1e-5


def test_auto_boundary_and_solver_follow_the_process():
    method = ConsistencyDistillation()
    assert method.resolved_boundary(RectifiedFlow()) == "x0"
    assert method.resolved_boundary(DiscreteDDPM()) == "lcm"
    grid = skipping_schedule(DiscreteDDPM(), 50)
    assert grid[:3].tolist() == [999, 979, 959] and grid[-2:].tolist() == [19, -1]  # k = 20


def test_teacher_solver_steps_equal_hand_computed_ddim_and_euler():
    g = torch.Generator().manual_seed(0)
    x0, eps, x = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    d = Denoised(x0, eps)
    ddpm = DiscreteDDPM()
    t, s = torch.tensor([999.0, 519.0]), torch.tensor([979.0, 499.0])
    abar = ddpm.alphas_cumprod[s.long()]
    hand = abar.sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar).sqrt().view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(ddim_deterministic_step(d, s, ddpm), hand.float())
    torch.testing.assert_close(
        ConsistencyDistillation().solver_step(d, x, t, s, ddpm), hand.float()
    )
    flow = RectifiedFlow()
    t, s = torch.tensor([1.0, 0.5]), torch.tensor([0.98, 0.48])
    hand = x + (s - t).view(-1, 1, 1, 1) * (eps - x0)  # dx/dt = eps - x0
    torch.testing.assert_close(euler_step(d, x, t, s, flow), hand)
    torch.testing.assert_close(ConsistencyDistillation().solver_step(d, x, t, s, flow), hand)


def test_guidance_fold_is_the_conditional_teacher_at_scale_one_and_cfg_per_sample():
    teacher = Denoiser(tiny_dit(), RectifiedFlow(), "velocity")
    cond, uncond = conditions()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        one = ClassifierFreeGuidance(teacher, torch.ones(3), cond, uncond)(x, t)
        plain = teacher(x, t, **cond)
        assert torch.equal(one.x0, plain.x0) and torch.equal(one.eps, plain.eps)
        mixed = ClassifierFreeGuidance(teacher, torch.tensor([1.0, 3.0, 5.0]), cond, uncond)(x, t)
        for i, scale in enumerate([1.0, 3.0, 5.0]):
            ref = ClassifierFreeGuidance(teacher, scale, cond, uncond)(x, t)
            torch.testing.assert_close(mixed.x0[i], ref.x0[i])
    assert not torch.allclose(mixed.x0[1], plain.x0[1])


class Oracle(nn.Module):
    """Rectified-flow velocity for data concentrated at one point x*: v = (x - x*) / t."""

    def __init__(self, x_star: Tensor) -> None:
        super().__init__()
        self.register_buffer("x_star", x_star)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor, t: Tensor, **cond: Tensor) -> Tensor:
        t = (t / 1000.0).clamp(min=1e-6).view(-1, 1, 1, 1)  # model time -> process time
        return (x - self.x_star) / t + 0 * self.dummy


def test_target_starts_equal_to_the_student_and_a_consistent_student_has_zero_loss():
    x_star = torch.randn(1, 4, 8, 8)
    process = RectifiedFlow()
    models = Models(
        Denoiser(Oracle(x_star), process, "velocity"),
        Denoiser(Oracle(x_star), process, "velocity"),
        process,
    )
    method = ConsistencyDistillation(num_solver_steps=10, guidance_scale=(1.0, 4.0))
    method.setup(models)
    student = dict(models.student.net.named_parameters())
    assert all(torch.equal(p, student[n]) for n, p in method.target_network.named_parameters())
    assert list(method.parameters()) == []  # θ⁻ is no parameter
    loss, logs = method.generator_loss(batch(latents=x_star.expand(3, -1, -1, -1)), models)
    assert loss.item() < 1e-6 and set(logs) == {"consistency_loss", "guidance_scale"}


def test_ema_target_update_and_exact_state_round_trip():
    process = RectifiedFlow()
    models = Models(
        Denoiser(tiny_dit(), process, "velocity"),
        Denoiser(tiny_dit(), process, "velocity"),
        process,
    )
    method = ConsistencyDistillation(target_decay=0.9)
    method.setup(models)
    before = copy.deepcopy(method.target_network)
    with torch.no_grad():
        for p in models.student.net.parameters():
            p.add_(1.0)
    method.after_student_step(models)
    student = dict(models.student.net.named_parameters())
    for (name, old), new in zip(
        before.named_parameters(), method.target_network.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * student[name])
    restored = ConsistencyDistillation(target_decay=0.9)
    restored.load_state_dict(method.state_dict())  # before setup: kept until then
    restored.setup(Models(Denoiser(tiny_dit(), process, "velocity"), models.teacher, process))
    for a, b in zip(
        restored.target_network.parameters(), method.target_network.parameters(), strict=True
    ):
        assert torch.equal(a, b)


def test_guidance_embedding_starts_as_a_no_op_and_reaches_the_network():
    net = tiny_dit()
    student = copy.deepcopy(net)
    process = RectifiedFlow()
    models = Models(
        Denoiser(student, process, "velocity"), Denoiser(net, process, "velocity"), process
    )
    method = ConsistencyDistillation(guidance_embedding=True, guidance_scale=(2.0, 6.0))
    method.setup(models)
    assert student.config()["guidance_embed"] and not net.config()["guidance_embed"]
    cond, _ = conditions()
    x, t = torch.randn(3, 4, 8, 8), torch.full((3,), 500.0)
    with torch.no_grad():
        ref = net(x, t, **cond)
        assert torch.equal(student(x, t, **cond, guidance=torch.tensor([1.0, 4.0, 9.0])), ref)
        with pytest.raises(ValueError, match="guidance_embed=False"):
            net(x, t, **cond, guidance=torch.ones(3))
        torch.nn.init.normal_(student.g_embedder[2].weight)
        f = method.student_denoiser(models.student)  # sampled at the range's midpoint 4
        out = f.bind(**cond)(x, torch.tensor(0.5)).x0
        at4 = f(x, 0.5, **cond, guidance=torch.full((3,), 4.0)).x0
        at8 = f(x, 0.5, **cond, guidance=torch.full((3,), 8.0)).x0
    assert torch.equal(out, at4) and not torch.allclose(out, at8)


def test_consistency_sampler_returns_the_oracle_data_and_renoises_with_the_generator():
    x_star = torch.randn(1, 4, 8, 8)
    process = RectifiedFlow()
    oracle = Denoiser(Oracle(x_star), process, "velocity").bind()
    noise = torch.randn(2, 4, 8, 8)
    for steps in (1, 2, 4):
        out = Consistency(steps=steps)(oracle, noise, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    f = Denoiser(tiny_dit(), process, "velocity").bind(**conditions(2)[0])
    with torch.no_grad():
        one = Consistency(steps=1)(f, noise)
        assert torch.equal(one, f(noise, torch.tensor(1.0)).x0)
        a, b, c = (
            Consistency(steps=3)(f, noise, torch.Generator().manual_seed(s)) for s in (0, 0, 1)
        )
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_explicit_student_timesteps():
    sampler = Consistency(timesteps=[999, 759, 499, 259])
    ddpm = DiscreteDDPM()
    assert sampler.steps == sampler.nfe == 4
    assert sampler.timesteps(ddpm).tolist() == [999, 759, 499, 259, -1]
    assert sampler.with_steps(2).timesteps(ddpm).tolist() == [999, 499, -1]
    assert sampler.with_steps(1).timesteps(ddpm).tolist() == [999, -1]
    assert sampler.init_args() == {
        "steps": 4,
        "spacing": "trailing",
        "timesteps": [999.0, 759.0, 499.0, 259.0],
    }
    with pytest.raises(ValueError, match="at most 4 steps"):
        sampler.with_steps(8).timesteps(ddpm)
    with pytest.raises(ValueError, match="descending"):
        Euler(timesteps=[0.5, 0.9])
    with pytest.raises(ValueError, match="must lie in"):
        Euler(timesteps=[2.0, 0.5]).timesteps(RectifiedFlow())


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="guidance_scale"):
        ConsistencyDistillation(guidance_scale=(5.0, 2.0))
    with pytest.raises(ValueError, match="loss"):
        ConsistencyDistillation(loss="l1")


@pytest.mark.parametrize("kind", ["ddpm"])
def test_lcm_fit_through_the_cli_on_a_tiny_teacher(kind, tmp_path):
    teacher = build_tiny_teacher(tmp_path / "teacher", kind)
    config = cpu_student_config(CONFIGS / "student/lcm_shapes.yaml", teacher, tmp_path)
    run(
        [
            "fit",
            "-c",
            str(config),
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--model.init_args.method.init_args.guidance_scale=[1.5, 3.0]",
            "--model.init_args.method.init_args.guidance_embedding=true",
            "--model.init_args.sampler.init_args.timesteps=[999, 499]",
            "--model.init_args.eval_steps=[1, 2]",
        ]
    )
    run_dir = tmp_path / "student_lcm"
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", weights_only=False)
    assert not [k for k in ckpt["state_dict"] if k.startswith("teacher.")]
    assert "method._extra_state" in ckpt["state_dict"]  # θ⁻ for exact resume
    assert any("g_embedder" in k for k in ckpt["state_dict"])
    assert ckpt["student_sampler"]["timesteps"][2] == [999.0, 499.0, -1.0]
    table = (run_dir / "eval_table.md").read_text()
    assert "| student_2 | Consistency(2) | 2 |" in table
