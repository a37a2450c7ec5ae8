"""A teacher with a text refiner through `fewstep ship` and the student export: the shipped folder
(stock transformer + text_refiner/) loads back as the same teacher, its RefinedPixArtSigmaPipeline
samples as the teacher does, the manifest covers the refiner, and students distilled from it
export with the refiner (plain and guidance-embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from student_fixtures import build_tiny_cache, build_tiny_vae, teacher_yaml, train_tiny_teacher
from torch import Tensor

from fewstep.cli import run
from fewstep.diffusion import Euler
from fewstep.distill.guidance import GuidanceDistillation
from fewstep.distill.reflow import Reflow
from fewstep.export.pixart_pipeline import EXPORT_RECORD, export_student_pipeline
from fewstep.export.refined_pixart import (
    RefinedGuidedPixArtSigmaPipeline,
    RefinedPixArtSigmaPipeline,
)
from fewstep.lightning.checkpoints import load_teacher, load_trained
from fewstep.lightning.student_module import StudentModule
from fewstep.utils.manifest import ShippedModelError

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation:DeprecationWarning",
        "ignore:.*init_noise_sigma.*:FutureWarning",
    ),
]


@pytest.fixture(scope="module")
def refined(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(fit YAML, checkpoint, shipped folder) of a tiny flow teacher with a 1-block refiner."""
    root = tmp_path_factory.mktemp("refined_teacher")
    vae_dir = build_tiny_vae(root / "vae")
    cache = build_tiny_cache(root / "cache", vae_dir, num_samples=12)
    config = teacher_yaml(cache, vae_dir, "flow")
    config["model"]["init_args"]["network"]["init_args"] |= {
        "text_refiner_depth": 1,
        "text_refiner_width": 16,
        "text_refiner_max_tokens": 64,
    }
    path = root / "teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    ckpt = train_tiny_teacher(path, root / "teacher.ckpt", cache)
    out = root / "shipped"
    run(["ship", "--config", str(path), "--ckpt_path", str(ckpt), "--out", str(out)])
    return path, ckpt, out


def text_and_noise() -> tuple[Tensor, Tensor, Tensor]:
    """Two 384-wide captions (the second padded) and 8x16x16 latent noise."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    return torch.randn(2, 5, 384, generator=g), mask, torch.randn(2, 8, 16, 16, generator=g)


def assert_close(pipe: Tensor, reference: Tensor) -> None:
    """Equal within 1e-4 relative to the largest entry."""
    assert reference.abs().mean() > 0.1
    assert (pipe - reference).abs().max() <= 1e-4 * reference.abs().max()


def pipeline_latents(folder: Path, pipeline_class, **call) -> Tensor:
    """The exported pipeline's latents for text_and_noise() (no negative prompt: guidance 1 or
    the null text's embeddings passed by the caller)."""
    text, mask, noise = text_and_noise()
    pipe = pipeline_class.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        prompt_embeds=text,
        prompt_attention_mask=mask.long(),
        latents=noise.clone(),
        output_type="latent",
        **{"use_resolution_binning": False, **call},
    ).images


def test_shipped_refined_teacher_loads_equal_and_its_pipeline_samples_as_it(refined):
    config, ckpt, out = refined
    trained, _, _ = load_trained(config, ckpt, ema=True)
    loaded = load_teacher(str(out / "teacher.yaml"), None)
    mine, theirs = loaded.network.state_dict(), trained.network.state_dict()
    assert mine.keys() == theirs.keys() and any(k.startswith("text_refiner.") for k in mine)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert trained.network.text_refiner.proj_out.weight.abs().sum() > 0  # trained: not identity
    text, mask, noise = text_and_noise()
    with torch.no_grad():
        ours = loaded.sample_latents(text, mask, noise, guidance_scale=1.0)
        assert torch.equal(ours, trained.sample_latents(text, mask, noise, guidance_scale=1.0))
    call = json.loads((out / EXPORT_RECORD).read_text())["pipeline_call"]
    call = {**call, "guidance_scale": 1.0}
    assert_close(pipeline_latents(out, RefinedPixArtSigmaPipeline, **call), ours)


def test_manifest_covers_the_refiner_and_a_changed_refiner_weight_is_refused(refined, tmp_path):
    config, ckpt, _ = refined
    copy = tmp_path / "shipped"
    run(["ship", "--config", str(config), "--ckpt_path", str(ckpt), "--out", str(copy)])
    files = json.loads((copy / "manifest.json").read_text())["files"]
    assert {"text_refiner/config.json", "text_refiner/diffusion_pytorch_model.safetensors"} <= set(
        files
    )
    weights = copy / "text_refiner" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedModelError, match="text_refiner/.*safetensors has sha256"):
        load_teacher(str(copy / "teacher.yaml"), None)


def student(config: Path, ckpt: Path | None, method) -> StudentModule:
    """A student of the refined teacher, weights moved off it (refiner included)."""
    torch.manual_seed(0)
    ckpt = None if ckpt is None else str(ckpt)
    module = StudentModule(str(config), ckpt, method, Euler(steps=2), eval_steps=[1]).eval()
    with torch.no_grad():
        for p in module.student.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module


@pytest.mark.parametrize("kind", ["reflow", "guidance", "reflow_of_shipped"])
def test_students_of_a_refined_teacher_export_with_the_refiner(refined, kind, tmp_path):
    config, ckpt, shipped = refined
    if kind == "reflow_of_shipped":  # the teacher loaded from the shipped folder (PretrainedDiT)
        config, ckpt = shipped / "teacher.yaml", None
    method = GuidanceDistillation((1.0, 4.0)) if kind == "guidance" else Reflow()
    module = student(config, ckpt, method)
    assert module.student.text_refiner is not None
    denoiser = method.student_denoiser(module.models.student)
    out = tmp_path / kind
    export_student_pipeline(module.student, str(module.vae_path), out, denoiser, module.sampler)
    record = json.loads((out / EXPORT_RECORD).read_text())
    pipeline_class = RefinedPixArtSigmaPipeline
    if kind == "guidance":
        pipeline_class = RefinedGuidedPixArtSigmaPipeline
    assert record["pipeline_class"].endswith(pipeline_class.__name__)
    text, mask, noise = text_and_noise()
    with torch.no_grad():
        ours = module.student_latents(text, mask, noise, steps=2)
    theirs = pipeline_latents(out, pipeline_class, **record["pipeline_calls"]["2"])
    assert_close(theirs, ours)
