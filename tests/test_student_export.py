"""Distilled students out as diffusers PixArtSigmaPipeline folders whose scheduler reproduces the
student's few-step sampling (LCMScheduler for consistency students of DDPM teachers, flow Euler
for Euler students of rectified-flow teachers), through the API and `fewstep export`."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from diffusers import LCMScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from student_fixtures import (
    CONFIGS,
    TEXT_DIM,
    TinyTeacher,
    build_tiny_teacher,
    cpu_student_config,
    quiet_trainer,
)
from torch import Tensor

from fewstep.cli import run
from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.diffusion import Consistency, DiscreteDDPM, Euler
from fewstep.diffusion.consistency import lcm_boundary
from fewstep.distill.consistency import ConsistencyDistillation
from fewstep.distill.guidance import GuidanceDistillation
from fewstep.distill.reflow import Reflow
from fewstep.export.guided_pixart import GuidedPixArtSigmaPipeline, GuidedPixArtTransformer2DModel
from fewstep.export.pixart_pipeline import EXPORT_RECORD, export_student_pipeline
from fewstep.export.schedulers import X0_TIMESTEP_SCALING, Boundary
from fewstep.lightning.checkpoints import apply_ema, ema_state, load_module
from fewstep.lightning.ema import EMA
from fewstep.lightning.student_module import StudentModule
from fewstep.models.dit_convert import from_diffusers, state_dict_to_diffusers, to_diffusers
from fewstep.models.text_encoder import TextEncoder, default_text_encoder_path
from fewstep.tools.export import training_text_encoder

STEPS = [1, 2, 4]
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation:DeprecationWarning",
        "ignore:.*init_noise_sigma.*:FutureWarning",  # flow: read from the scheduler config
    ),
]


@pytest.fixture(scope="module")
def ddpm_teacher(tmp_path_factory) -> TinyTeacher:
    """A tiny DDPM-ε teacher with learned sigma (PixArt's process)."""
    return build_tiny_teacher(tmp_path_factory.mktemp("ddpm"), "ddpm")


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory) -> TinyTeacher:
    """A tiny rectified-flow velocity teacher."""
    return build_tiny_teacher(tmp_path_factory.mktemp("flow"), "flow")


def student(teacher: TinyTeacher, method, sampler) -> StudentModule:
    """A student whose weights are moved off the teacher's (so the export must carry them)."""
    torch.manual_seed(0)
    module = StudentModule(
        str(teacher.config), str(teacher.ckpt), method, sampler, eval_steps=[1, 2]
    ).eval()
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module


def text_and_noise(seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Two captions (padded text + mask) and latent noise."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    text = torch.randn(2, 5, TEXT_DIM, generator=g) * mask[..., None]
    return text, mask, torch.randn(2, 8, 16, 16, generator=g)


def ours(module: StudentModule, n: int, seed: int = 7) -> Tensor:
    """The student's n-step latents from text_and_noise(), re-noising from seed."""
    text, mask, noise = text_and_noise()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        return module.student_latents(text, mask.bool(), noise, steps=n, generator=gen)


def run_pipeline(out: Path, pipeline_class=PixArtSigmaPipeline, seed: int = 7, **call) -> Tensor:
    """The exported pipeline's latents from text_and_noise() with keyword arguments ``call``."""
    text, mask, noise = text_and_noise()
    pipe = pipeline_class.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=text,
        prompt_attention_mask=mask,
        latents=noise.clone(),
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **call,
    ).images


def pipeline_latents(out: Path, n: int, seed: int = 7) -> Tensor:
    """The exported pipeline's n-step latents from the same inputs (recorded call kwargs)."""
    call = json.loads((out / EXPORT_RECORD).read_text())["pipeline_calls"][str(n)]
    return run_pipeline(out, seed=seed, **call)


def assert_close(pipe: Tensor, reference: Tensor) -> None:
    """Equal within 1e-4 relative to the largest entry (a random ε-net's x0 is large)."""
    assert reference.abs().mean() > 0.1
    assert (pipe - reference).abs().max() <= 1e-4 * reference.abs().max()


def export(module: StudentModule, out: Path, steps: list[int] = STEPS) -> dict:
    """Export through the API, as `fewstep export` does; returns the record."""
    denoiser = module.method.student_denoiser(module.models.student)
    export_student_pipeline(module.student, module.vae_path, out, denoiser, module.sampler, steps)
    return json.loads((out / EXPORT_RECORD).read_text())


def test_lcm_student_on_ddpm_matches_the_pipeline_at_1_2_4_steps(ddpm_teacher, tmp_path):
    module = student(ddpm_teacher, ConsistencyDistillation(), Consistency(steps=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # exact: no boundary or grid warning
        record = export(module, tmp_path / "lcm")
    calls = record["pipeline_calls"]
    assert {k: calls["4"][k] for k in ("num_inference_steps", "guidance_scale")} == {
        "num_inference_steps": 4,
        "guidance_scale": 1.0,
    }
    assert "timesteps" not in calls["4"]  # LCM's own picks: the plain call
    assert all(c["guidance_scale"] == 1.0 for c in calls.values())
    assert record["student"]["exact_steps"] == STEPS and record["pipeline_call"] == calls["4"]
    assert max(record["student"]["boundary"]["mismatch"].values()) < 1e-9
    scheduler = PixArtSigmaPipeline.from_pretrained(tmp_path / "lcm").scheduler
    assert isinstance(scheduler, LCMScheduler) and scheduler.config.original_inference_steps == 4
    for n in STEPS:  # same generator seed on both sides: LCM re-noises like our sampler
        assert_close(pipeline_latents(tmp_path / "lcm", n), ours(module, n))
    assert not torch.equal(ours(module, 2, seed=7), ours(module, 2, seed=8))  # noise matters


@pytest.mark.parametrize("timesteps", [None, [1.0, 0.8, 0.5, 0.3]])
def test_euler_student_on_flow_matches_the_pipeline_at_1_2_4_steps(
    flow_teacher, tmp_path, timesteps
):
    sampler = Euler(steps=4, timesteps=timesteps)
    module = student(flow_teacher, Reflow(), sampler)
    record = export(module, tmp_path / "euler")
    calls = record["pipeline_calls"]
    expected = sampler.with_steps(4).timesteps(module.process)[:-1].tolist()
    if timesteps is None:  # the scheduler's own walk: the plain call
        assert "sigmas" not in calls["4"] and calls["4"]["num_inference_steps"] == 4
    else:  # a custom grid is passed explicitly
        assert calls["4"]["sigmas"] == pytest.approx(expected)
    assert all(c["guidance_scale"] == 1.0 for c in calls.values())
    for n in STEPS:
        assert_close(pipeline_latents(tmp_path / "euler", n), ours(module, n))


def test_consistency_student_on_flow_exports_its_one_step_sampling(flow_teacher, tmp_path):
    module = student(flow_teacher, ConsistencyDistillation(), Consistency(steps=4))
    with pytest.warns(UserWarning, match=r"1-step samples only"):
        record = export(module, tmp_path / "flow_lcm")
    assert list(record["pipeline_calls"]) == ["1"] and record["student"]["exact_steps"] == [1]
    assert_close(pipeline_latents(tmp_path / "flow_lcm", 1), ours(module, 1))


def test_boundary_constants_equal_lcm_schedulers_up_to_the_t_plus_1_offset():
    process, t = DiscreteDDPM(), torch.arange(1.0, 1000.0, dtype=torch.float64)
    for sigma_data, scaling in [(0.5, 10.0), (0.25, 4.0)]:
        boundary = Boundary("lcm", sigma_data, scaling)
        lcm = LCMScheduler(timestep_scaling=boundary.lcm_timestep_scaling)
        theirs = lcm.get_scalings_for_boundary_condition_discrete(t)
        shifted = lcm_boundary(t - 1.0, process, sigma_data, scaling)  # ours use t - t_clean
        for a, b in zip(theirs, shifted, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
        at = lcm_boundary(t, process, sigma_data, scaling)  # the gap at the same t: tiny above 249
        gap = sum((a - b).abs() for a, b in zip(theirs, at, strict=True))
        assert gap[248:].max() < 1e-9 and gap[:4].max() > 1e-6
    lcm = LCMScheduler(timestep_scaling=X0_TIMESTEP_SCALING)  # boundary x0: f = x̂0
    c_skip, c_out = lcm.get_scalings_for_boundary_condition_discrete(t)
    assert c_skip.max() < 1e-12 and (c_out - 1.0).abs().max() < 1e-12


def test_small_student_timesteps_warn_of_the_boundary_gap(ddpm_teacher, tmp_path):
    module = student(ddpm_teacher, ConsistencyDistillation(), Consistency(timesteps=[999, 2]))
    with pytest.warns(UserWarning, match=r"timesteps \[2\].*boundary|boundary.*timesteps \[2\]"):
        record = export(module, tmp_path / "small", steps=[2])
    assert record["student"]["boundary"]["mismatch"]["2"] > 1e-4


def test_unexportable_students_raise_clear_errors(ddpm_teacher, tmp_path):
    cases = [
        (Reflow(), Euler(steps=2), r"flow time.*rectified-flow teacher"),
        (ConsistencyDistillation(), Consistency(timesteps=[998.5, 499.0]), r"integer timesteps"),
        (ConsistencyDistillation(), Euler(steps=2), r"sample it with Consistency"),
    ]
    for method, sampler, message in cases:
        module = student(ddpm_teacher, method, sampler)
        with pytest.raises(ValueError, match=message):
            export(module, tmp_path / "never", steps=[sampler.steps])
        assert not (tmp_path / "never").exists()


def fit_one_step(config: Path, teacher: TinyTeacher, root: Path) -> tuple[StudentModule, Path]:
    """One distillation step of the student YAML with an EMA callback; the checkpoint path."""
    pl.seed_everything(0, verbose=False)
    module = load_module(config)
    trainer = quiet_trainer(1, root, callbacks=[EMA(decay=0.5)])
    data = CachedLatentDataModule(str(teacher.cache), batch_size=4, val_fraction=0.25)
    trainer.fit(module, datamodule=data)
    ckpt = root / "student.ckpt"
    trainer.save_checkpoint(ckpt)
    return module, ckpt


def test_export_cli_writes_the_ema_student_with_its_lcm_scheduler(ddpm_teacher, tmp_path):
    yaml_path = CONFIGS / "student/lcm_shapes.yaml"
    config = cpu_student_config(yaml_path, ddpm_teacher, tmp_path, eval_steps=[1, 2, 4])
    module, ckpt = fit_one_step(config, ddpm_teacher, tmp_path)
    raw = copy.deepcopy(module.student.state_dict())
    apply_ema(module, ema_state(torch.load(ckpt, weights_only=False)))
    ema = module.student.state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA != raw weights

    out = tmp_path / "exported"
    run(["export", "-c", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    exported = PixArtTransformer2DModel.from_pretrained(out / "transformer").state_dict()
    expected = state_dict_to_diffusers(ema)
    assert all(torch.equal(exported[k], expected[k]) for k in expected)
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["kind"] == "student" and record["method"] == "ConsistencyDistillation"
    assert record["source"]["weights"] == "ema" and sorted(record["pipeline_calls"]) == [
        "1",
        "2",
        "4",
    ]
    assert record["teacher"]["sha256"] == module.teacher_identity["sha256"]
    assert_close(pipeline_latents(out, 2), ours(module.eval(), 2))
    card = (out / "README.md").read_text()  # the model card
    assert "library_name: diffusers" in card and module.teacher_identity["sha256"] in card
    assert json.dumps(record["pipeline_calls"]["2"]) in card and "| 4 |" in card


def test_exported_student_takes_prompts_through_the_encoder_of_its_cache(flow_teacher, tmp_path):
    """The tiny cache was encoded by the packaged MiniLM, so `fewstep export` adds it: the
    pipeline called with captions gives the student's latents from MiniLM's embeddings."""
    yaml_path = CONFIGS / "student/ladd_shapes.yaml"
    config = cpu_student_config(yaml_path, flow_teacher, tmp_path, eval_steps=[1, 2, 4])
    module, ckpt = fit_one_step(config, flow_teacher, tmp_path)
    apply_ema(module, ema_state(torch.load(ckpt, weights_only=False)))
    out = tmp_path / "exported"
    run(["export", "-c", str(config), "--ckpt_path", str(ckpt), "--out", str(out)])
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["text_encoder"]["path"] == default_text_encoder_path()

    captions = ["a photo of a red circle", "a photo of two blue squares left of a triangle"]
    text, mask = TextEncoder().eval()(captions)  # as the cache builder encoded the captions
    noise = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = module.eval().student_latents(text, mask, noise, steps=2)
    pipe = PixArtSigmaPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(
        prompt=captions,
        latents=noise.clone(),
        output_type="latent",
        clean_caption=False,
        **record["pipeline_calls"]["2"],
    ).images
    assert_close(latents, expected)


def test_no_text_encoder_is_exported_for_a_cache_of_another_encoder(flow_teacher, tmp_path):
    config = tmp_path / "student.yaml"
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = json.loads((flow_teacher.cache / "manifest.json").read_text())
    manifest["text_encoder"]["fingerprint"]["weights"] = "0" * 64  # some other encoder's weights
    (cache / "manifest.json").write_text(json.dumps(manifest))
    config.write_text(json.dumps({"data": {"init_args": {"path": str(cache)}}}))
    path, why = training_text_encoder(config)
    assert path is None and "another text encoder" in why
    config.write_text(json.dumps({"data": {"init_args": {"path": str(tmp_path / "none")}}}))
    assert training_text_encoder(config)[0] is None
    config.write_text(json.dumps({"data": {"init_args": {"path": str(flow_teacher.cache)}}}))
    assert training_text_encoder(config)[0] == default_text_encoder_path()


def plain_pipeline_latents(out: Path, n: int, seed: int = 7) -> Tensor:
    """The exported pipeline called plainly: only the step count and guidance_scale=1 (plus the
    inputs, and no resolution binning, which PixArtSigmaPipeline refuses for a 16-latent model)."""
    plain = {"num_inference_steps": n, "guidance_scale": 1.0, "use_resolution_binning": False}
    return run_pipeline(out, seed=seed, negative_prompt=None, **plain)


@pytest.mark.parametrize("kind", ["lcm_ddpm", "euler_flow"])
def test_a_plain_pipeline_call_reproduces_the_student_at_each_step_count(
    kind, ddpm_teacher, flow_teacher, tmp_path
):
    if kind == "lcm_ddpm":
        module = student(ddpm_teacher, ConsistencyDistillation(), Consistency(steps=4))
    else:
        module = student(flow_teacher, Reflow(), Euler(steps=4))
    record = export(module, tmp_path / kind)
    for n in STEPS:  # the recorded call is the plain one: no timesteps/sigmas to pass
        assert set(record["pipeline_calls"][str(n)]) <= {
            "num_inference_steps",
            "guidance_scale",
            "use_resolution_binning",
        }
        assert_close(plain_pipeline_latents(tmp_path / kind, n), ours(module, n))


def guided_pipeline_latents(out: Path, n: int, scale: float, seed: int = 7) -> Tensor:
    """The exported guided pipeline at n steps and embedded CFG scale ``scale``."""
    transformer = GuidedPixArtSigmaPipeline.from_pretrained(out, local_files_only=True).transformer
    assert isinstance(transformer, GuidedPixArtTransformer2DModel)
    call = {"num_inference_steps": n, "guidance_scale": scale, "use_resolution_binning": False}
    return run_pipeline(out, GuidedPixArtSigmaPipeline, seed, negative_prompt=None, **call)


@pytest.mark.parametrize("kind", ["guidance_flow", "lcm_w_ddpm"])
def test_guidance_embedded_students_export_with_the_scale_in_the_pipeline_call(
    kind, ddpm_teacher, flow_teacher, tmp_path
):
    if kind == "guidance_flow":  # guidance distillation (Meng et al. 2023 stage one)
        module = student(flow_teacher, GuidanceDistillation((1.0, 6.0)), Euler(steps=4))
    else:  # LCM's w-conditioned consistency student (LCM §4.2)
        method = ConsistencyDistillation(
            guidance_scale=(1.5, 3.0), guidance_embedding=True, sample_guidance_scale=2.5
        )
        module = student(ddpm_teacher, method, Consistency(steps=4))
    assert module.student.g_embedder[2].weight.abs().sum() > 0  # perturbed: the scale matters
    record = export(module, tmp_path / kind)
    scale = 2.5 if kind == "lcm_w_ddpm" else module.guidance_scale
    assert record["pipeline_class"].endswith("guided_pixart.GuidedPixArtSigmaPipeline")
    assert all(c["guidance_scale"] == scale for c in record["pipeline_calls"].values())
    assert "GuidedPixArtSigmaPipeline" in (tmp_path / kind / "README.md").read_text()
    for n in STEPS:
        assert_close(guided_pipeline_latents(tmp_path / kind, n, scale), ours(module, n))
    other = guided_pipeline_latents(tmp_path / kind, 2, scale + 2.0)
    assert (other - ours(module, 2)).abs().max() > 1e-3  # the call's scale reaches the network


def test_a_guided_transformer_round_trips_and_asks_for_its_scale(flow_teacher):
    module = student(flow_teacher, GuidanceDistillation(), Euler(steps=2))
    dit = module.student
    model = to_diffusers(dit, GuidedPixArtTransformer2DModel)
    back = from_diffusers(model)
    ours_sd, back_sd = dit.state_dict(), back.state_dict()
    assert set(ours_sd) == set(back_sd) and "g_embedder.2.weight" in back_sd
    assert all(torch.equal(ours_sd[k], back_sd[k]) for k in ours_sd)
    with pytest.raises(ValueError, match="GuidedPixArtTransformer2DModel"):
        to_diffusers(dit)
    x, t = torch.randn(1, 8, 16, 16), torch.tensor([500.0])
    text = torch.randn(1, 5, TEXT_DIM)
    with pytest.raises(ValueError, match="needs the CFG scale"):
        model(
            x,
            encoder_hidden_states=text,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        )


@pytest.mark.parametrize("kind", ["flow", "ddpm"])
def test_scm_students_export_their_consistency_sampling(kind, ddpm_teacher, flow_teacher, tmp_path):
    """sCM (TrigFlow) students sample as the network on the teacher's own process."""
    from fewstep.distill.scm import SCM

    teacher = flow_teacher if kind == "flow" else ddpm_teacher
    module = student(teacher, SCM(), Consistency(steps=4))
    if kind == "flow":  # a rectified-flow consistency student exports its 1-step sampling
        with pytest.warns(UserWarning, match=r"1-step samples only"):
            record = export(module, tmp_path / kind)
    else:
        record = export(module, tmp_path / kind)
    steps = [1] if kind == "flow" else STEPS
    assert record["student"]["exact_steps"] == steps
    for n in steps:
        assert_close(pipeline_latents(tmp_path / kind, n), ours(module, n))
