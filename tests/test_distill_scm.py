"""sCM in TrigFlow (Lu & Song 2024; SANA-Sprint): the JVP tangent against finite differences of
f_θ along the teacher's PF-ODE (float64), the finite-difference option, zero loss for an exact
consistency function, warm-up, tangent normalisation, the adaptive weight (closed-form minimiser,
joint-objective gradients), the proposal times, the LADD combination, and the CLI: fit/validate
from the YAML, exact resume, the GPU and LADD overlays."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import yaml
from student_fixtures import (
    TinyTeacher,
    build_tiny_teacher,
    cpu_student_config,
    resolved_config,
    tiny_teacher_args,
)
from test_distill_consistency import Oracle
from test_distill_ladd import grads, tiny_batch, tiny_models
from test_resume_exact import _check_resume, _student_config
from torch import Tensor, nn

from fewstep.cli import run
from fewstep.diffusion.continuous_consistency import (
    adaptive_weighted_loss,
    normalize_tangent,
    scm_tangent,
    warmup_ratio,
)
from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.samplers import Consistency
from fewstep.diffusion.schedules import DiscreteDDPM, RectifiedFlow
from fewstep.diffusion.trigflow import TrigFlowDenoiser, TrigFlowTime
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.ladd import LADD
from fewstep.distill.scm import SCM
from fewstep.models.adaptive_weight import AdaptiveWeight

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "configs/student/scm_shapes.yaml"
GPU_OVERLAY = ROOT / "configs/student/scm_shapes_gpu.yaml"
LADD_OVERLAY = {  # SANA-Sprint's sCM + LADD as an overlay on scm_shapes.yaml
    "model": {
        "init_args": {
            "method": {
                "init_args": {
                    "ladd": {
                        "class_path": "fewstep.distill.ladd.LADD",
                        "init_args": {
                            "feature_blocks": None,
                            "head_hidden": 16,
                            "head_cond_dim": 16,
                        },
                    },
                    "ladd_weight": 0.5,
                }
            },
            "disc_optimizer": {
                "class_path": "torch.optim.AdamW",
                "init_args": {"lr": 0.0001, "betas": [0.0, 0.99], "weight_decay": 0.0},
            },
        }
    }
}
C, HW, TEXT_DIM = 4, 8, 16


class SmoothNet(nn.Module):
    """A small network of (x, model time, text) computed wholly in the input's precision (the
    DiT embeds time in float32), so float64 finite differences resolve its time derivative."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(C + 2, 16), nn.Linear(16, C)
        self.text = nn.Linear(TEXT_DIM, 16)

    def forward(self, x: Tensor, model_t: Tensor, text: Tensor, text_mask: Tensor) -> Tensor:
        tt = (model_t.to(x.dtype) / 1000.0).view(-1, 1, 1, 1).expand(-1, *x.shape[2:], 1)
        h = torch.cat([x.permute(0, 2, 3, 1), torch.sin(3 * tt), torch.cos(2 * tt)], -1)
        pooled = (text * text_mask[..., None]).sum(1) / text_mask.sum(1, keepdim=True)
        h = torch.tanh(self.inp(h) + self.text(pooled)[:, None, None])  # [B, h, w, 16]
        return self.out(h).permute(0, 3, 1, 2)  # [B, h, w, C] -> [B, C, h, w]


def smooth_models(process, prediction: str, scale: float = 2.0) -> Models:
    teacher = SmoothNet(0).double().requires_grad_(False)
    student = SmoothNet(1).double()
    return Models(
        Denoiser(student, process, prediction),
        Denoiser(teacher, process, prediction),
        process,
        guidance_scale=scale,
    )


def f_theta(student: TrigFlowDenoiser, x_t: Tensor, t: Tensor, sd: float, cond) -> Tensor:
    """f_θ(x_t, t) = cos(t) x_t - sin(t) sigma_d F_θ(x_t / sigma_d, t) (sCM eq. 9)."""
    cos, sin = torch.cos(t).view(-1, 1, 1, 1), torch.sin(t).view(-1, 1, 1, 1)
    return cos * x_t - sin * sd * student.velocity(x_t / sd, t, **cond)


def tangent_and_reference(
    method: SCM, models: Models, batch: DistillBatch, t: Tensor, h: float = 1e-5
):
    """(g at r = 1 before normalisation, cos(t) x the central difference of f_θ along the
    teacher's PF-ODE) at x_t = sigma_d (cos x0 + sin z)."""
    sd = method.sigma_data
    student = TrigFlowDenoiser.wrap(models.student)
    g = torch.Generator().manual_seed(3)
    x0 = batch.latents.double()
    z = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    x_unit = torch.cos(t).view(-1, 1, 1, 1) * x0 + torch.sin(t).view(-1, 1, 1, 1) * z
    velocity = method.teacher_velocity(x_unit, t, batch, models)
    with torch.no_grad():
        cs_df_dt = method.student_tangent(student, x_unit, t, velocity, batch)
        f_minus = student.velocity(x_unit, t, **batch.cond)
        tangent = scm_tangent(f_minus, sd * velocity, sd * x_unit, cs_df_dt, t, sd, 1.0)
        x_t, dx = sd * x_unit, sd * velocity
        plus = f_theta(student, x_t + h * dx, t + h, sd, batch.cond)
        minus = f_theta(student, x_t - h * dx, t - h, sd, batch.cond)
    return tangent, torch.cos(t).view(-1, 1, 1, 1) * (plus - minus) / (2 * h)


def double_batch(seed: int = 1) -> DistillBatch:
    batch = tiny_batch(seed)
    return dataclasses.replace(
        batch,
        latents=batch.latents.double(),
        text=batch.text.double(),
        null_text=torch.randn(3, 2, TEXT_DIM, dtype=torch.float64),
    )


TIMES = torch.tensor([0.2, 0.9, 1.4], dtype=torch.float64)


@pytest.mark.parametrize(
    ("process", "prediction"), [(RectifiedFlow(), "velocity"), (DiscreteDDPM(), "epsilon")]
)
def test_jvp_tangent_is_cos_t_times_the_derivative_of_f_along_the_pf_ode(process, prediction):
    models = smooth_models(process, prediction)
    tangent, reference = tangent_and_reference(SCM(), models, double_batch(), TIMES)
    torch.testing.assert_close(tangent, reference, rtol=1e-6, atol=1e-7)


def test_jvp_works_through_the_dit_attention_on_cpu():
    """F.scaled_dot_product_attention's fused CPU kernel has no forward-mode AD: the JVP runs on
    the math kernel; the DiT embeds time in float32, hence the looser tolerance."""
    models = tiny_models()
    models = dataclasses.replace(models, guidance_scale=2.0)
    for net in (models.student.net, models.teacher.net):
        net.double()
    tangent, reference = tangent_and_reference(SCM(), models, double_batch(), TIMES, h=1e-4)
    scale = reference.abs().max()
    torch.testing.assert_close(tangent / scale, reference / scale, rtol=0, atol=2e-3)


def test_finite_difference_option_agrees_with_the_jvp():
    models, batch = smooth_models(RectifiedFlow(), "velocity"), double_batch()
    student = TrigFlowDenoiser.wrap(models.student)
    x = torch.randn(3, C, HW, HW, dtype=torch.float64)
    t = torch.tensor([0.3, 1.0, math.pi / 2 - 1e-5], dtype=torch.float64)  # the last one-sided
    velocity = SCM().teacher_velocity(x, t, batch, models)
    jvp = SCM(tangent="jvp").student_tangent(student, x, t, velocity, batch)
    fd = SCM(tangent="finite_difference", finite_difference_epsilon=1e-6)
    difference = fd.student_tangent(student, x, t, velocity, batch)
    torch.testing.assert_close(difference, jvp, rtol=1e-5, atol=1e-6)
    method_jvp, method_fd = SCM(warmup_steps=0), SCM(warmup_steps=0, tangent="finite_difference")
    dit, dit_batch = dataclasses.replace(tiny_models(), guidance_scale=2.0), tiny_batch()
    g_jvp = method_jvp.scm_terms(dit_batch, dit)[1]
    g_fd = method_fd.scm_terms(tiny_batch(), dit)[1]  # same seeds: same t, z (float32)
    assert (g_fd - g_jvp).norm() < 2e-3 * g_jvp.norm()  # the default epsilon 1e-4


def test_an_exact_consistency_function_has_zero_tangent_and_loss():
    x_star = torch.randn(1, C, HW, HW, dtype=torch.float64)
    process = RectifiedFlow()
    oracle = Oracle(x_star).double()
    models = Models(
        Denoiser(oracle, process, "velocity"), Denoiser(oracle, process, "velocity"), process
    )
    batch = dataclasses.replace(double_batch(), latents=x_star.expand(3, -1, -1, -1))
    tangent, reference = tangent_and_reference(SCM(), models, batch, TIMES)
    assert tangent.abs().max() < 1e-9 and reference.abs().max() < 1e-5  # f = sigma_d x* const
    loss, logs = SCM(warmup_steps=0, adaptive_weighting=False).generator_loss(batch, models)
    assert loss.item() < 1e-18 and logs["scm_error"].item() < 1e-18


def test_warmup_ramps_the_second_term_and_is_saved():
    assert [warmup_ratio(k, 4) for k in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert warmup_ratio(0, 0) == 1.0
    args = [torch.randn(2, C, HW, HW) for _ in range(4)]
    t = torch.tensor([0.4, 1.1], dtype=torch.float64)
    g0, g1 = (scm_tangent(*args, t, 0.5, r) for r in (0.0, 1.0))
    torch.testing.assert_close(scm_tangent(*args, t, 0.5, 0.25), 0.75 * g0 + 0.25 * g1)
    models, method = tiny_models(), SCM(warmup_steps=4)
    logs = [method.generator_loss(tiny_batch(), models)[1]["tangent_warmup"].item()]
    for _ in range(2):
        method.after_student_step(models)
    logs.append(method.generator_loss(tiny_batch(), models)[1]["tangent_warmup"].item())
    assert logs == [0.0, 0.5]
    restored = SCM(warmup_steps=4)
    restored.load_state_dict(method.state_dict())
    assert int(restored.student_steps) == 2


def test_tangent_normalisation_keeps_the_direction_and_bounds_the_rms():
    g = torch.randn(3, C, HW, HW) * torch.tensor([0.01, 1.0, 100.0]).view(-1, 1, 1, 1)
    out = normalize_tangent(g, c=0.1)
    rms = g.flatten(1).pow(2).mean(1).sqrt()
    out_rms = out.flatten(1).pow(2).mean(1).sqrt()
    torch.testing.assert_close(out_rms, rms / (rms + 0.1))
    torch.testing.assert_close(out / out_rms.view(-1, 1, 1, 1), g / rms.view(-1, 1, 1, 1))
    torch.testing.assert_close(normalize_tangent(g, c=0.0).flatten(1).pow(2).mean(1), torch.ones(3))


def test_adaptive_weight_learns_the_closed_form_minimiser():
    """e^w s - w is minimised by w = -log s: w_φ(t) equalises the loss across times (eq. 8)."""
    weight = AdaptiveWeight(channels=32)
    t = torch.tensor([0.3, 1.2], dtype=torch.float64)
    errors = torch.tensor([0.25, 4.0])
    assert torch.equal(weight(t), torch.zeros(2))  # zero-initialised: unweighted at the start
    opt = torch.optim.Adam(weight.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        adaptive_weighted_loss(errors, weight(t)).mean().backward()
        opt.step()
    torch.testing.assert_close(weight(t).detach(), -torch.log(errors), rtol=0, atol=0.02)


def test_second_optimiser_steps_give_the_joint_objectives_gradients():
    models, method = tiny_models(), SCM(warmup_steps=0)
    with torch.no_grad():
        method.weight_net.linear.weight.normal_(0.0, 0.3)
    batch = tiny_batch()
    loss, _ = method.generator_loss(batch, models)
    student_grads = torch.autograd.grad(loss, list(models.student.net.parameters()))
    w_loss, logs = method.discriminator_loss(batch, models)  # the cached error of this batch
    weight_grads = torch.autograd.grad(w_loss, list(method.weight_net.parameters()))
    f, g, t = method.scm_terms(tiny_batch(), models)  # the joint objective in one graph
    error = (f - f.detach() - g).pow(2).flatten(1).mean(1)
    joint = adaptive_weighted_loss(error, method.weight_net(t)).mean()
    params = [*models.student.net.parameters(), *method.weight_net.parameters()]
    expected = torch.autograd.grad(joint, params)
    for got, want in zip([*student_grads, *weight_grads], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert set(logs) == {"weight_loss", "adaptive_weight"}


def test_teacher_gets_no_gradients_and_the_weight_none_in_the_student_step():
    models, method = tiny_models(), SCM()
    loss, logs = method.generator_loss(tiny_batch(), models)
    loss.backward()
    assert all(g is None for g in grads(models.teacher.net))
    assert all(g is not None for g in grads(models.student.net))
    assert all(p.grad is None for p in method.weight_net.parameters())
    assert {"scm_error", "scm_loss", "tangent_warmup", "adaptive_weight"} <= set(logs)


def test_proposal_times_are_the_tan_transformed_log_normal():
    method = SCM(sigma_data=0.5, p_mean=-0.4, p_std=1.3)
    models = tiny_models()
    batch = tiny_batch()
    t = method.scm_terms(batch, models)[2]
    tau = torch.randn(3, generator=tiny_batch().generator, dtype=torch.float64)
    torch.testing.assert_close(
        t, torch.arctan(torch.exp(-0.4 + 1.3 * tau) / 0.5), **{"rtol": 0, "atol": 0}
    )
    assert TrigFlowTime(RectifiedFlow()).t_max == math.pi / 2


def test_optimisers_follow_the_weight_and_ladd():
    plain = SCM(adaptive_weighting=False)
    assert plain.num_optimizers == 1 and list(plain.discriminator_parameters()) == []
    with pytest.raises(NotImplementedError, match="one optimiser"):
        plain.discriminator_loss(tiny_batch(), tiny_models())
    assert SCM().num_optimizers == 2
    models = tiny_models()
    method = SCM(
        ladd=LADD(feature_blocks=[0, -1], head_hidden=16, head_cond_dim=16), ladd_weight=0.5
    )
    method.setup(models)
    assert method.num_optimizers == 2
    second = {id(p) for p in method.discriminator_parameters()}
    assert second == {
        id(p) for p in [*method.ladd.heads.parameters(), *method.weight_net.parameters()]
    }
    batch = tiny_batch()
    loss, logs = method.generator_loss(batch, models)
    scm_only = logs["scm_loss"] + 0.5 * logs["ladd_g_adv"]
    torch.testing.assert_close(loss.detach(), scm_only)
    d_loss, d_logs = method.discriminator_loss(batch, models)
    torch.testing.assert_close(d_loss.detach(), d_logs["d_hinge"] + d_logs["weight_loss"])
    assert any(k.startswith("ladd.heads.") for k in method.state_dict())


def test_student_samples_with_the_consistency_sampler_in_trigflow_time():
    x_star = torch.randn(1, C, HW, HW)
    process = RectifiedFlow()
    student = Denoiser(Oracle(x_star), process, "velocity")
    f = SCM().student_denoiser(student)
    assert isinstance(f.process, TrigFlowTime)
    noise = torch.randn(2, C, HW, HW)
    for steps in (1, 2, 4):
        out = Consistency(steps=steps)(f.bind(), noise, torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, x_star.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sigma_data": 0.0}, "sigma_data"),
        ({"tangent": "exact"}, "tangent"),
        ({"finite_difference_epsilon": 0.0}, "finite_difference_epsilon"),
        ({"p_std": -1.0}, "p_std"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SCM(**kwargs)


# --- the CLI -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory) -> TinyTeacher:
    return build_tiny_teacher(tmp_path_factory.mktemp("scm_teacher"), "flow")


def test_scm_config_fits_validates_and_saves_no_teacher(tiny_teacher, tmp_path):
    config = cpu_student_config(CONFIG, tiny_teacher, tmp_path)
    run(["fit", "-c", str(config), "--trainer.max_steps=4", "--trainer.val_check_interval=2"])
    last = tmp_path / "student_scm/checkpoints/last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    state = saved["state_dict"]
    assert not [k for k in state if k.startswith("teacher.")]
    assert "method.weight_net.linear.weight" in state and int(state["method.student_steps"]) == 2
    walked = saved["student_sampler"]["timesteps"]
    torch.testing.assert_close(walked[2], [math.pi / 2, math.pi / 4, 0.0])  # TrigFlow times
    run(["validate", "-c", str(config), "--ckpt_path", str(last)])
    table = (tmp_path / "student_scm/eval_table.md").read_text()
    assert "| student_2 | Consistency(2) | 2 |" in table


def test_scm_resumes_exactly_with_the_adaptive_weight(tiny_teacher, tmp_path):
    config = _student_config("scm_shapes.yaml", tiny_teacher, tmp_path)  # 2 optimiser steps/batch
    _check_resume(config, [], total=10, stops=[4, 6])
    saved = torch.load(tmp_path / "kept/last.ckpt", map_location="cpu", weights_only=True)
    assert any(k.startswith("method.weight_net.") for k in saved["state_dict"])
    assert len(saved["optimizer_states"]) == 2


def test_gpu_overlay_resolves_to_gpu_sizes(tiny_teacher, tmp_path, capsys):
    """scm_shapes_gpu.yaml layered on scm_shapes.yaml (tests/test_configs.py runs it)."""
    base = cpu_student_config(CONFIG, tiny_teacher, tmp_path)
    resolved = resolved_config(capsys, base, GPU_OVERLAY)
    model, trainer = resolved["model"]["init_args"], resolved["trainer"]
    assert model["teacher_config"] == "configs/teacher/shapes_gpu.yaml" and model["use_teacher_ema"]
    assert resolved["data"]["init_args"]["batch_size"] == 128
    assert trainer["precision"] == "bf16-mixed" and trainer["max_steps"] == 8000
    method = model["method"]
    assert method["class_path"] == "fewstep.distill.scm.SCM"
    assert method["init_args"]["warmup_steps"] == 1000 and method["init_args"]["p_std"] == 1.6


def test_ladd_overlay_resolves_and_runs(tiny_teacher, tmp_path, capsys):
    base = cpu_student_config(CONFIG, tiny_teacher, tmp_path)
    overlay = tmp_path / "scm_ladd_overlay.yaml"
    overlay.write_text(yaml.safe_dump(LADD_OVERLAY))
    layered = ["-c", str(base), "-c", str(overlay)]
    method = resolved_config(capsys, base, overlay)["model"]["init_args"]["method"]["init_args"]
    assert (
        method["ladd"]["class_path"] == "fewstep.distill.ladd.LADD" and method["ladd_weight"] == 0.5
    )
    assert method["adaptive_weighting"] and method["tangent"] == "jvp"
    run(["fit", *layered, *tiny_teacher_args(tiny_teacher, tmp_path)])
