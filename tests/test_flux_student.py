"""Distilling a Flux teacher: configs/student/progressive_flux_shapes.yaml and the LCM recipe run
through `fewstep fit`/`validate` on a tiny FLUX.1-architecture teacher; the batch's pooled text
vector (``cond``) reaches teacher and student (the null caption's with CFG's unconditional half);
a guidance-embedded teacher (FLUX.1-dev style) costs one pass per step in the NFE count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from student_fixtures import (
    CONFIGS,
    LATENT_CHANNELS,
    TEXT_DIM,
    TinyTeacher,
    build_tiny_cache,
    build_tiny_vae,
    cpu_student_config,
    flux_data,
    train_flux_teacher,
)

from fewstep.cli import run
from fewstep.diffusion.samplers import Euler
from fewstep.lightning.checkpoints import load_module
from fewstep.lightning.sampling import as_null_text
from fewstep.lightning.student_module import StudentModule

pytestmark = pytest.mark.usefixtures("one_thread")

PROGRESSIVE = CONFIGS / "student/progressive_flux_shapes.yaml"
LCM = CONFIGS / "student/lcm_shapes.yaml"


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[bool, TinyTeacher]:
    """Tiny Flux teachers keyed by guidance_embed (two-pass CFG, or the scale as an input)."""
    root = tmp_path_factory.mktemp("flux_teachers")
    vae = build_tiny_vae(root / "vae")
    cache = build_tiny_cache(root / "cache", vae, num_samples=16)
    return {g: train_flux_teacher(root, cache, vae, g) for g in (False, True)}


def fit_and_validate(config: Path, *extra: str) -> dict[str, float]:
    """`fewstep fit` (one step) then `fewstep validate`; the validation metrics."""
    run(["fit", "-c", str(config), "--trainer.fast_dev_run=true", *extra])
    cli = run(["validate", "-c", str(config), "--trainer.limit_val_batches=1", *extra])
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_progressive_flux_config_distils_and_counts_teacher_passes(
    teachers, tmp_path, guidance_embed
):
    config = cpu_student_config(PROGRESSIVE, teachers[guidance_embed], tmp_path)
    metrics = fit_and_validate(config)
    steps = Euler(steps=2).nfe  # cpu_student_config: the teacher's 2-step Euler reference
    assert metrics["val/teacher/nfe"] == steps * (1 if guidance_embed else 2)
    assert metrics["val/student_1/nfe"] == 1 and metrics["val/student_2/nfe"] == 2
    assert metrics["val/student_1/latent_mse"] > 0


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_lcm_recipe_distils_a_flux_teacher(teachers, tmp_path, guidance_embed):
    config = cpu_student_config(LCM, teachers[guidance_embed], tmp_path)
    metrics = fit_and_validate(config, "--data.init_args.pooled_text=mean_tokens")
    assert metrics["val/teacher/nfe"] == (2 if guidance_embed else 4)
    assert metrics["val/student_2/nfe"] == 2


def test_later_progressive_rounds_keep_the_guidance_input(teachers, tmp_path):
    """Round >= 1 teaches with the previous round's student, which (copied from a FLUX.1-dev
    style teacher) still takes the scale as an input."""
    config = cpu_student_config(PROGRESSIVE, teachers[True], tmp_path)
    extra = ("--model.init_args.method.init_args.steps_per_round=1", "--trainer.fast_dev_run=3")
    metrics = fit_and_validate(config, *extra)  # rounds 0, 1 and 2 each train one step
    assert metrics["val/student_1/latent_mse"] > 0


def record_conds(net: torch.nn.Module) -> list[torch.Tensor]:
    """The ``cond`` of every forward of ``net`` from now on."""
    seen: list[torch.Tensor] = []
    net.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["cond"].detach().clone()), with_kwargs=True
    )
    return seen


def student_of(teacher: TinyTeacher, tmp_path: Path) -> StudentModule:
    """The StudentModule of the progressive Flux config, with the datamodule's null text."""
    module = load_module(cpu_student_config(PROGRESSIVE, teacher, tmp_path))
    module._null_text = as_null_text(flux_data(teacher.cache).null_text())
    return module


def test_pooled_vectors_reach_teacher_and_student(teachers, tmp_path):
    module = student_of(teachers[False], tmp_path)
    data = flux_data(teachers[False].cache)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    valid = batch["text_mask"][..., None].float()  # mean_tokens: mean of the valid tokens
    expected = (batch["text"] * valid).sum(1) / valid.sum(1)
    torch.testing.assert_close(batch["cond"], expected, rtol=1e-5, atol=1e-6)
    null = module.null_text()
    teacher_seen, student_seen = record_conds(module.teacher), record_conds(module.student)
    distill = module.distill_batch(batch, torch.Generator().manual_seed(0))
    module.method.generator_loss(distill, module.models)
    assert len(teacher_seen) == 2  # round 0: two teacher steps, each one batched CFG pass
    for guided in teacher_seen:  # [cond; uncond]
        torch.testing.assert_close(guided[:4], batch["cond"], rtol=0, atol=0)
        torch.testing.assert_close(guided[4:], null.cond.expand(4, -1), rtol=0, atol=0)
    (student,) = student_seen
    torch.testing.assert_close(student, batch["cond"], rtol=0, atol=0)
    teacher_seen.clear()
    student_seen.clear()
    noise = torch.randn(2, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(1))
    text, mask, cond = batch["text"][:2], batch["text_mask"][:2], batch["cond"][:2]
    module.teacher_latents(text, mask, noise, cond)
    module.student_latents(text, mask, noise, 2, cond=cond)
    assert len(teacher_seen) == 2 and len(student_seen) == 2  # 2 Euler steps, 2 DDIM steps
    assert all(torch.equal(c[:2], cond) for c in teacher_seen + student_seen)


@torch.no_grad()
def test_guidance_embedded_teacher_samples_in_one_pass_per_step(teachers, tmp_path):
    module = student_of(teachers[True], tmp_path)
    module._null_text = None  # a guidance-embedded teacher needs no null text
    sizes: list[int] = []
    module.teacher.register_forward_pre_hook(
        lambda m, args, kwargs: sizes.append(kwargs["guidance"].shape[0]), with_kwargs=True
    )
    noise = torch.randn(3, LATENT_CHANNELS, 16, 16, generator=torch.Generator().manual_seed(2))
    text, mask = torch.randn(3, 5, TEXT_DIM), torch.ones(3, 5, dtype=torch.bool)
    cond = torch.randn(3, TEXT_DIM)
    module.teacher_latents(text, mask, noise, cond)
    assert sizes == [3, 3] and module.teacher_nfe == 2  # conditional batch only, 2 Euler steps


@pytest.mark.parametrize("guidance_embed", [False, True])
def test_a_shipped_flux_teacher_loads_without_its_checkpoint_and_distils(
    teachers, tmp_path, guidance_embed
):
    """`fewstep ship` of an MMDiT teacher: a FLUX.1 pipeline folder whose teacher.yaml loads the
    trained EMA weights (PretrainedFlux) and keeps the pooled-text setting; a student then
    distils it with no checkpoint named."""
    import json

    from fewstep.lightning.checkpoints import load_trained
    from fewstep.lightning.student_module import load_teacher

    teacher, out = teachers[guidance_embed], tmp_path / "shipped"
    args = ["--config", str(teacher.config), "--ckpt_path", str(teacher.ckpt), "--out", str(out)]
    run(["ship", *args, "--info", json.dumps({"score": {"overall": 0.25}})])
    shipped = yaml.safe_load((out / "teacher.yaml").read_text())
    assert shipped["model"]["init_args"]["network"]["class_path"].endswith("PretrainedFlux")
    assert shipped["data"] == {"init_args": {"pooled_text": "mean_tokens"}}
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    trained, _, _ = load_trained(teacher.config, teacher.ckpt, ema=True)
    loaded = load_teacher(str(out / "teacher.yaml"), None)
    mine, theirs = loaded.network.state_dict(), trained.network.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.guidance_scale == trained.guidance_scale

    student = TinyTeacher(out, out / "teacher.yaml", None, teacher.cache, out / "vae", "flow")
    config = cpu_student_config(LCM, student, tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["model"]["init_args"]["teacher_ckpt"] = None
    config.write_text(yaml.safe_dump(raw))
    metrics = fit_and_validate(config, "--data.init_args.pooled_text=mean_tokens")
    assert metrics["val/student_2/nfe"] == 2 and metrics["val/student_1/latent_mse"] > 0
