"""Guidance distillation (Meng et al. 2023, stage one): math invariants and the one-pass student."""

import copy
import dataclasses

import pytest
import torch

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.guidance import ClassifierFreeGuidance, GuidanceEmbedded
from fewstep.diffusion.schedules import DiscreteDDPM, RectifiedFlow
from fewstep.distill.base import DistillBatch, Models
from fewstep.distill.guidance import GuidanceDistillation
from fewstep.models.dit import DiT

B, C, HW, TEXT_DIM = 3, 4, 8, 16


def tiny_models(process=None, prediction="velocity") -> Models:
    torch.manual_seed(0)
    net = DiT(C, 2, 32, 2, 2, caption_channels=TEXT_DIM, learn_sigma=False, sample_size=HW)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student = copy.deepcopy(net)
    process = process or RectifiedFlow()
    return Models(
        Denoiser(student, process, prediction),
        Denoiser(net.requires_grad_(False).eval(), process, prediction),
        process,
        guidance_scale=3.0,
    )


def tiny_batch() -> DistillBatch:
    g = torch.Generator().manual_seed(1)
    return DistillBatch(
        latents=torch.randn(B, C, HW, HW, generator=g),
        text=torch.randn(B, 5, TEXT_DIM, generator=g),
        text_mask=torch.ones(B, 5, dtype=torch.bool),
        null_text=torch.zeros(B, 2, TEXT_DIM),
        null_mask=torch.ones(B, 2, dtype=torch.bool),
        generator=torch.Generator().manual_seed(2),
    )


def oracle_net(teacher_net, null_text, null_mask):
    """A w-conditioned network that is exactly the guided teacher: u + w (c - u) on the raw
    prediction (CFG is affine in the prediction at fixed x_t)."""

    def net(x, t, text, text_mask, guidance):
        c = teacher_net(x, t, text, text_mask)
        u = teacher_net(x, t, null_text[: len(x)], null_mask[: len(x)])
        return u + guidance.view(-1, 1, 1, 1) * (c - u)

    return net


@pytest.mark.parametrize(
    "process, prediction", [(RectifiedFlow(), "velocity"), (DiscreteDDPM(), "epsilon")]
)
def test_loss_is_zero_when_the_student_is_the_guided_teacher(process, prediction):
    models = tiny_models(process, prediction)
    batch = tiny_batch()
    method = GuidanceDistillation(guidance_scale=(1.0, 6.0))
    method.setup(models)
    oracle = Denoiser(
        oracle_net(models.teacher.net, batch.null_text, batch.null_mask), process, prediction
    )
    loss, logs = method.generator_loss(batch, dataclasses.replace(models, student=oracle))
    assert loss.item() < 1e-9 and 1.0 <= logs["guidance_scale"] <= 6.0
    real_loss, _ = method.generator_loss(tiny_batch(), models)  # the zero-init student is not
    assert real_loss.item() > 1e-6


def test_one_pass_student_equals_two_pass_cfg_at_its_scale():
    models = tiny_models()
    batch = tiny_batch()
    net = oracle_net(models.teacher.net, batch.null_text, batch.null_mask)
    one_pass = GuidanceEmbedded(net, models.process, "velocity", scale=3.0)
    two_pass = ClassifierFreeGuidance(models.teacher, 3.0, batch.cond, batch.uncond)
    x, t = torch.randn(B, C, HW, HW), torch.tensor([0.9, 0.5, 0.2])
    with torch.no_grad():
        torch.testing.assert_close(one_pass(x, t, **batch.cond).x0, two_pass(x, t).x0)


def test_setup_adds_a_zero_guidance_embedding_and_reads_the_reference_scale():
    models = tiny_models()
    method = GuidanceDistillation()
    x, t = torch.randn(B, C, HW, HW), torch.full((B,), 500.0)
    batch = tiny_batch()
    with torch.no_grad():
        before = models.student.net(x, t, batch.text, batch.text_mask)
        method.setup(models)
        after = models.student.net(
            x, t, batch.text, batch.text_mask, guidance=torch.full((B,), 4.0)
        )
    torch.testing.assert_close(before, after)  # zero-initialised: no change until trained
    assert method.sample_scale == 3.0 and models.teacher.net.g_embedder is None
    assert isinstance(method.student_denoiser(models.student), GuidanceEmbedded)


@pytest.mark.parametrize("scale", [(0.5, 2.0), (4.0, 2.0)])
def test_bad_scale_range_is_one_clear_error(scale):
    with pytest.raises(ValueError, match="guidance_scale"):
        GuidanceDistillation(guidance_scale=scale)


def test_a_guidance_distilled_student_is_the_teacher_of_another_method(tmp_path):
    """Its fit YAML + checkpoint serve as teacher_config/teacher_ckpt: the next student (here
    progressive distillation) starts from its EMA weights, keeps the scale embedding and its
    teacher costs one pass per guided step."""
    import yaml
    from student_fixtures import CONFIGS, build_tiny_teacher, cpu_student_config

    from fewstep.cli import run

    tiny = build_tiny_teacher(tmp_path / "teacher")
    (tmp_path / "g").mkdir()
    guidance = cpu_student_config(CONFIGS / "student/guidance_shapes.yaml", tiny, tmp_path / "g")
    run(["fit", "-c", str(guidance), "--trainer.max_steps=2", "--trainer.limit_val_batches=0"])
    ckpt = next((tmp_path / "g").rglob("last.ckpt"))
    first = dataclasses.replace(tiny, config=guidance, ckpt=ckpt)
    progressive = cpu_student_config(CONFIGS / "student/progressive_shapes.yaml", first, tmp_path)
    cli = run(["validate", "-c", str(progressive), "--trainer.limit_val_batches=1"])
    module = cli.model
    assert module.teacher.g_embedder is not None and module.student.g_embedder is not None
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    raw = {
        k.removeprefix("student."): v for k, v in saved["state_dict"].items() if k[:8] == "student."
    }
    teacher = (
        module.teacher.state_dict()
    )  # the first student's raw weights (use_teacher_ema: false)
    assert "g_embedder.2.weight" in raw and set(raw) == set(teacher)
    assert all(torch.equal(teacher[k], v) for k, v in raw.items())
    steps = yaml.safe_load(progressive.read_text())["model"]["init_args"]["teacher_sampler"]
    nfe = cli.trainer.callback_metrics["val/teacher/nfe"]
    assert nfe == steps["init_args"]["steps"]  # one pass per step: the scale is an input
