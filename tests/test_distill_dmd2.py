"""DMD2 (Yin et al. 2024): the distribution-matching gradient on Gaussians known in closed form,
gradient routing, the fake score's diffusion loss, backward simulation, the two time-scale
schedule, config errors, and a CPU fit/validate/resume through the CLI from the YAMLs."""

import dataclasses
from pathlib import Path

import pytest
import torch
from student_fixtures import (
    TinyTeacher,
    build_tiny_teacher,
    cpu_student_config,
    resolved_config,
    tiny_teacher_args,
)
from test_distill_ladd import grads, tiny_batch, tiny_models
from test_flux_methods import tiny_flux_models
from test_resume_exact import _check_resume, _student_config
from torch import nn

from fewstep.cli import run
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.parameterization import from_x0_eps
from fewstep.diffusion.samplers import DDIM, Consistency
from fewstep.diffusion.schedules import DiscreteDDPM, NoiseProcess, RectifiedFlow
from fewstep.diffusion.timesteps import TimestepSampler
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.dmd2 import DMD2, generator_step_due

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs/student/dmd2_shapes.yaml"
GPU_OVERLAY = ROOT / "configs/student/dmd2_shapes_gpu.yaml"


# --------------------------------------------------------------------------- closed-form Gaussians
def process_time(process: NoiseProcess, model_time: torch.Tensor) -> torch.Tensor:
    """Invert model_time: flow t * 1000, DDPM t itself."""
    return model_time / 1000.0 if isinstance(process, RectifiedFlow) else model_time


class GaussianDenoiserNet(nn.Module):
    """The exact denoiser of data x0 ~ N(mu (+ text[:, 0, 0] if ``text_shift``), s^2 I):
    E[x0 | x_t] (Gaussian posterior), in ``prediction``'s parameterisation; records its inputs."""

    def __init__(
        self, process: NoiseProcess, prediction: str, mu: float, s: float, text_shift: bool
    ) -> None:
        super().__init__()
        self.process, self.prediction, self.mu, self.s = process, prediction, mu, s
        self.text_shift = text_shift
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, model_time, text, text_mask):
        t = process_time(self.process, model_time.double())
        alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in self.process.alpha_sigma(t))
        shift = text[:, 0, 0].double().reshape(-1, 1, 1, 1) if self.text_shift else 0.0
        mean = self.mu + shift  # [B, 1, 1, 1]
        x = x.double()
        x0 = mean + alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2) * (x - alpha * mean)
        self.calls.append((x, t))
        return from_x0_eps(x0, (x - alpha * x0) / sigma, alpha, sigma, self.prediction).float()


class FixedSampleNet(nn.Module):
    """A 'student' whose x0 is the parameter ``theta`` whatever its input."""

    def __init__(self, process: NoiseProcess, prediction: str, theta: torch.Tensor) -> None:
        super().__init__()
        self.process, self.prediction = process, prediction
        self.theta = nn.Parameter(theta)

    def forward(self, x, model_time, text, text_mask):
        t = process_time(self.process, model_time.double())
        alpha, sigma = (c.reshape(-1, 1, 1, 1).float() for c in self.process.alpha_sigma(t))
        eps = (x - alpha * self.theta) / sigma
        return from_x0_eps(self.theta, eps, alpha, sigma, self.prediction)


def gaussian_score(x_t, alpha, sigma, mean, s):
    """Marginal score of x_t = alpha x0 + sigma eps, x0 ~ N(mean, s^2): -(x_t - alpha mean) /
    (alpha^2 s^2 + sigma^2)."""
    return -(x_t - alpha * mean) / (alpha**2 * s**2 + sigma**2)


def gaussian_batch(b: int, shape: tuple[int, ...], shifts: torch.Tensor) -> DistillBatch:
    """A batch whose caption embeddings carry a per-sample mean shift in text[:, 0, 0]."""
    text = torch.zeros(b, 3, 4)
    text[:, 0, 0] = shifts
    return DistillBatch(
        latents=torch.full((b, *shape), 100.0),  # far from the student's samples
        text=text,
        text_mask=torch.ones(b, 3, dtype=torch.bool),
        null_text=torch.zeros(b, 2, 4),
        null_mask=torch.ones(b, 2, dtype=torch.bool),
        generator=torch.Generator().manual_seed(7),
    )


@pytest.mark.parametrize(
    "process, prediction",
    [(RectifiedFlow(), "velocity"), (DiscreteDDPM(), "epsilon")],
    ids=["flow-velocity", "ddpm-epsilon"],
)
def test_dm_gradient_is_the_scaled_score_difference_on_gaussians(process, prediction):
    b, shape, scale = 6, (1, 2, 2), 2.5
    real_mu, real_s, fake_mu, fake_s = 0.5, 0.8, -0.3, 1.4
    torch.manual_seed(0)
    theta = torch.randn(b, *shape)
    shifts = torch.linspace(-1.0, 1.0, b)
    real = GaussianDenoiserNet(process, prediction, real_mu, real_s, text_shift=True)
    student = FixedSampleNet(process, prediction, theta.clone())
    models = Models(
        student=Denoiser(student, process, prediction),
        teacher=Denoiser(real, process, prediction),
        process=process,
        student_sampler=DDIM(steps=1),
        guidance_scale=scale,
    )
    method = DMD2(min_time=0.1, max_time=0.9)
    method.setup(models)
    method.fake_score = GaussianDenoiserNet(process, prediction, fake_mu, fake_s, False)
    loss, _ = method.generator_loss(gaussian_batch(b, shape, shifts), models)
    loss.backward()

    (x_real, t_real), (x_fake, t_fake) = real.calls[0], method.fake_score.calls[0]
    assert x_real.shape[0] == 2 * b  # CFG: cond and uncond in one pass
    torch.testing.assert_close(x_real[:b], x_fake)
    torch.testing.assert_close(t_real[:b], t_fake)
    t_unit = (t_fake - process.t_clean) / (process.t_max - process.t_clean)
    assert bool(((t_unit >= 0.1 - 1e-6) & (t_unit <= 0.9 + 1e-6)).all())
    # independent reference: marginal scores in closed form, CFG on scores, Tweedie for x0
    alpha, sigma = (c.reshape(-1, 1, 1, 1) for c in process.alpha_sigma(t_fake))
    implied_noise = (x_fake - alpha * theta.double()) / sigma  # x_t re-noises the student's x0
    assert implied_noise.abs().max() < 6.0
    cond_mean = real_mu + shifts.double().reshape(-1, 1, 1, 1)  # [B] -> [B, 1, 1, 1]
    cond = gaussian_score(x_fake, alpha, sigma, cond_mean, real_s)
    uncond = gaussian_score(x_fake, alpha, sigma, real_mu, real_s)
    s_real = uncond + scale * (cond - uncond)
    s_fake = gaussian_score(x_fake, alpha, sigma, fake_mu, fake_s)
    real_x0 = (x_fake + sigma**2 * s_real) / alpha  # Tweedie: E[x0|x_t] = (x_t + sigma^2 s) / alpha
    weight = (theta.double() - real_x0).abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = sigma**2 / alpha * (s_fake - s_real) / weight  # = (fake x0 - real x0) / weight
    torch.testing.assert_close(
        student.theta.grad.double(), grad / theta.numel(), rtol=1e-4, atol=1e-7
    )
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-4)


def test_gradient_is_zero_while_the_fake_score_equals_the_teacher():
    models = tiny_models()  # guidance scale 1: the real score is the teacher's conditional one
    method = DMD2()
    method.setup(models)
    teacher, fake = models.teacher.net.state_dict(), method.fake_score.state_dict()
    assert all(torch.equal(teacher[k], fake[k]) for k in teacher)  # a copy of the teacher
    assert method.fake_score.training and all(
        p.requires_grad for p in method.fake_score.parameters()
    )
    loss, _ = method.generator_loss(tiny_batch(), models)
    loss.backward()
    assert loss.item() == 0.0
    assert all(g is None or not g.any() for g in grads(models.student.net))


# --------------------------------------------------------------------------- routing and losses
def guided_models(**kwargs) -> Models:
    """Tiny DiT teacher/student with CFG 2 and a 4-step consistency-style student grid."""
    return dataclasses.replace(
        tiny_models(), student_sampler=Consistency(steps=4), guidance_scale=2.0, **kwargs
    )


def test_generator_step_trains_only_the_student():
    models = guided_models()
    method = DMD2(gan_weight=0.5, head_hidden=16, head_cond_dim=16)
    method.setup(models)
    loss, logs = method.generator_loss(tiny_batch(), models)
    loss.backward()
    assert set(logs) == {"g_dm", "dm_weight", "g_gan", "student_t"}
    assert all(g is None for g in grads(models.teacher.net))
    assert all(g is None for g in grads(method))  # fake score and heads frozen in this graph
    assert all(p.requires_grad for p in method.parameters())  # flags restored
    assert sum(float(g.abs().sum()) for g in grads(models.student.net) if g is not None) > 0


class ConstantTime(TimestepSampler):
    """Every sample at process time ``t``."""

    def __init__(self, t: float) -> None:
        self.t = t

    def draw(self, batch, device, generator):
        return torch.full((batch,), self.t, device=device)


def test_fake_score_step_is_the_teachers_diffusion_loss_on_the_detached_student_sample():
    models = guided_models()
    method = DMD2(fake_timesteps=ConstantTime(0.3))
    method.setup(models)
    batch = tiny_batch()
    method.generator_loss(batch, models)
    x0 = method._fake[1]
    calls, seen = [], []
    models.student.net.register_forward_hook(lambda *a: calls.append(1))
    method.fake_score.register_forward_pre_hook(lambda module, args: seen.append(args[:2]))
    loss, logs = method.discriminator_loss(batch, models)
    loss.backward()
    assert calls == []  # reuses the generator step's sample, detached
    assert all(g is None for g in grads(models.teacher.net) + grads(models.student.net))
    assert any(g is not None and g.abs().sum() > 0 for g in grads(method.fake_score))
    # explicit rectified-flow velocity loss at t = 0.3 on the recorded input
    x_t, model_time = seen[0]
    assert torch.allclose(model_time, torch.full((x0.shape[0],), 300.0))
    eps = (x_t - 0.7 * x0) / 0.3
    with torch.no_grad():
        pred = method.fake_score(x_t, model_time, **batch.cond)
    assert logs["fake_diffusion"].item() == pytest.approx((pred - (eps - x0)).pow(2).mean().item())


def test_fake_score_trains_at_the_teachers_own_times_unless_told_otherwise():
    """fake_timesteps: null reads the teacher's timestep_sampler from Models (one owner)."""
    models = guided_models(teacher_timesteps=ConstantTime(0.6))
    g = torch.Generator().manual_seed(0)
    method = DMD2()
    method.setup(models)
    assert torch.equal(method.fake_times(3, models.process, g), torch.full((3,), 0.6))
    method = DMD2(fake_timesteps=ConstantTime(0.2))
    method.setup(models)
    assert torch.equal(method.fake_times(3, models.process, g), torch.full((3,), 0.2))


def test_gan_head_step_trains_the_fake_score_and_heads_on_data_vs_student():
    models = guided_models()
    method = DMD2(gan_weight=0.5, gan_head_weight=1.0, head_hidden=16, head_cond_dim=16)
    method.setup(models)
    seen = []
    method.heads.register_forward_pre_hook(lambda module, args: seen.append(args[0][0].shape))
    loss, logs = method.discriminator_loss(tiny_batch(), models)  # no G step: a fresh sample
    loss.backward()
    assert set(logs) == {"fake_diffusion", "d_gan"} and seen == [torch.Size([6, 16, 32])]
    assert all(g is not None for g in grads(method.heads))
    assert all(g is None for g in grads(models.teacher.net) + grads(models.student.net))
    assert logs["fake_diffusion"] + 1.0 * logs["d_gan"] == pytest.approx(loss.item())


# --------------------------------------------------------------------------- backward simulation
def test_multi_step_inputs_come_from_the_students_own_earlier_steps():
    models = guided_models()
    method = DMD2()
    method.setup(models)
    grid = [1.0, 0.75, 0.5, 0.25]
    assert method.student_times.tolist() == grid
    seen_steps = set()
    for seed in range(12):
        batch = tiny_batch(seed=seed)
        state = batch.generator.get_state()
        x_t, t = method.student_inputs(batch, models)
        batch.generator.set_state(state)  # the reference: the same draws, the sampler by hand
        i = int(torch.randint(0, 4, (1,), generator=batch.generator))
        noise = torch.randn(batch.latents.shape, generator=batch.generator)
        cond = models.student.bind(**batch.cond)
        with torch.no_grad():
            ref = (
                noise
                if i == 0
                else Consistency(4).sample(cond, noise, grid[: i + 1], batch.generator)
            )
        assert t.eq(grid[i]).all() and not x_t.requires_grad
        torch.testing.assert_close(x_t, ref, rtol=0, atol=0)
        seen_steps.add(i)
    assert seen_steps == {0, 1, 2, 3}
    data_noised = DMD2(backward_simulation=False)
    data_noised.setup(models)
    batch = tiny_batch(seed=3)  # draws index 1 or more (checked below)
    state = batch.generator.get_state()
    x_t, t = data_noised.student_inputs(batch, models)
    batch.generator.set_state(state)
    i = int(torch.randint(0, 4, (1,), generator=batch.generator))
    noise = torch.randn(batch.latents.shape, generator=batch.generator)
    assert i > 0
    torch.testing.assert_close(x_t, (1 - grid[i]) * batch.latents + grid[i] * noise)


# --------------------------------------------------------------------------- two time-scale rule
@pytest.mark.parametrize("n", [1, 3, 5])
def test_generator_steps_every_nth_batch_and_the_fake_score_every_batch(n):
    global_step, generator_batches, fake_steps = 0, [], 0
    for batch in range(4 * n + 1):  # Lightning's count: one global step per optimiser step
        if generator_step_due(global_step, n):
            generator_batches.append(batch)
            global_step += 1
        fake_steps += 1
        global_step += 1
    assert generator_batches == list(range(0, 4 * n + 1, n)) and fake_steps == 4 * n + 1
    assert DMD2(fake_steps_per_generator_step=n).generator_step_due(n + 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(fake_steps_per_generator_step=0), "fake_steps_per_generator_step"),
        (dict(min_time=0.5, max_time=0.4), "min_time/max_time"),
        (dict(max_time=1.5), "min_time/max_time"),
        (dict(gan_weight=-1.0), "gan_weight"),
    ],
)
def test_bad_config_is_one_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMD2(**kwargs)


def test_gan_head_needs_a_network_with_blocks_and_existing_blocks():
    with pytest.raises(ValueError, match="DMD2 gan_feature_blocks: .*3 blocks"):
        DMD2(gan_weight=0.1, gan_feature_blocks=[7]).setup(guided_models())
    flux = dataclasses.replace(tiny_flux_models(), student_sampler=Consistency(steps=4))
    method = DMD2(gan_weight=0.1, gan_feature_blocks=[-1], head_hidden=16)
    method.setup(flux)  # a Flux teacher: 2 double + 2 single blocks, the last single one read
    assert method.block_indices == [3] and method.heads.heads[0].norm.normalized_shape == (32,)
    with pytest.raises(ValueError, match="DMD2 gan_feature_blocks: .*4 blocks"):
        DMD2(gan_weight=0.1, gan_feature_blocks=[4]).setup(flux)
    models = guided_models()
    models.teacher.net = nn.Linear(2, 2)  # no blocks
    with pytest.raises(TypeError, match="DMD2 gan_weight > 0: .*Linear.*set gan_weight: 0.0"):
        DMD2(gan_weight=0.1).setup(models)


# ------------------------------------------------------------------ CLI: fit, validate, resume
@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> TinyTeacher:
    return build_tiny_teacher(tmp_path_factory.mktemp("dmd2_teacher"), "flow")


def adam_steps(checkpoint: dict) -> list[set[float]]:
    """Per optimiser, the set of Adam step counts over its parameters."""
    return [{float(s["step"]) for s in o["state"].values()} for o in checkpoint["optimizer_states"]]


def test_dmd2_config_fits_validates_and_resumes_on_the_ttur_schedule(tiny_teacher, tmp_path):
    config = _student_config("dmd2_shapes.yaml", tiny_teacher, tmp_path)
    last = tmp_path / "student_dmd2" / "checkpoints" / "last.ckpt"
    schedulers = [  # each optimiser's scheduler steps with it
        f"--model.init_args.{name}.{key}"
        for name in ("lr_scheduler", "disc_lr_scheduler")
        for key in ("class_path=torch.optim.lr_scheduler.StepLR", "init_args.step_size=1")
    ]
    fit = ["fit", "-c", str(config), *schedulers]
    run([*fit, "--trainer.max_steps=6"])  # batch 0: student + fake; batches 1-4: fake only
    first = torch.load(last, map_location="cpu", weights_only=False)
    state = first["state_dict"]
    assert not any(k.startswith("teacher.") for k in state)
    fake_keys = [k for k in state if k.startswith("method.fake_score.")]
    assert fake_keys and not any(k.startswith("method.heads.") for k in state)  # gan_weight 0
    assert adam_steps(first) == [{1.0}, {5.0}]  # TTUR: 1 student step, 5 fake-score steps
    assert [s["last_epoch"] for s in first["lr_schedulers"]] == [1, 5]
    assert len(first["optimizer_states"][1]["param_groups"][0]["params"]) == len(fake_keys)
    run(["validate", "-c", str(config), "--ckpt_path", str(last), "--trainer.limit_val_batches=1"])
    assert (tmp_path / "student_dmd2" / "eval_table.md").exists()
    run([*fit, "--trainer.max_steps=8", "--ckpt_path", str(last)])  # batch 5: both again
    second = torch.load(last, map_location="cpu", weights_only=False)
    assert second["global_step"] == 8 and adam_steps(second) == [{2.0}, {6.0}]


def test_dmd2_resumes_exactly_mid_epoch_with_the_gan_head(tiny_teacher, tmp_path):
    # N = 3: batches 0, 3, 6 step both (global steps 0->2, 4->6, 8->10); 4 batches an epoch. The
    # stop at 4 (mid-epoch 0) resumes into a student batch and crosses the epoch; the stop at 7
    # (mid-epoch 1, mid-cycle) fails for any clock other than the restored global step.
    extra = [
        "--model.init_args.method.init_args.fake_steps_per_generator_step=3",
        "--model.init_args.method.init_args.gan_weight=0.1",
        "--model.init_args.method.init_args.head_hidden=16",
        "--model.init_args.method.init_args.head_cond_dim=16",
    ]
    config = _student_config("dmd2_shapes.yaml", tiny_teacher, tmp_path)
    _check_resume(config, extra, total=10, stops=[4, 7])
    saved = torch.load(tmp_path / "kept" / "last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("method.heads.") for k in saved["state_dict"])
    assert not any(k.startswith("teacher.") for k in saved["state_dict"])


def test_gpu_overlay_resolves_and_runs(tiny_teacher, tmp_path, capsys):
    base = cpu_student_config(CONFIG, tiny_teacher, tmp_path)
    layered = ["-c", str(base), "-c", str(GPU_OVERLAY)]
    resolved = resolved_config(capsys, base, GPU_OVERLAY)
    model, trainer = resolved["model"]["init_args"], resolved["trainer"]
    assert model["teacher_config"] == "configs/teacher/shapes_gpu.yaml" and model["use_teacher_ema"]
    assert resolved["data"]["init_args"]["batch_size"] == 128
    assert trainer["precision"] == "bf16-mixed" and trainer["max_steps"] == 24000
    assert model["method"]["init_args"]["fake_steps_per_generator_step"] == 5  # from the base
    run(["fit", *layered, *tiny_teacher_args(tiny_teacher, tmp_path)])
