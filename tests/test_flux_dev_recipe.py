"""The FLUX.1-dev LoRA recipe end to end on a tiny FLUX.1 folder: configs/cache/flux_dev.yaml
builds a T5 + CLIP cache with the folder's encoders and VAE; configs/teacher/
flux_dev_pretrained.yaml validates the frozen teacher; configs/student/lcm_flux_dev_lora.yaml
fits, validates and exports a rank-64 LoRA student, and with configs/fsdp/flux.yaml resolves to
an FSDP run. The teacher's sampling grid is FluxPipeline's at 1024 px."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_flux_cache import make_tiny_clip, make_tiny_clip_tokenizer
from tiny_t5 import make_tiny_t5, make_tiny_tokenizer
from transformers import T5EncoderModel

from fewstep.cli import run
from fewstep.data.cache import LatentCache
from fewstep.data.image_folder import write_image_folder
from fewstep.data.shapes import ShapesWorld
from fewstep.export.lora import DIFFUSERS_FILE as LORA_FILE
from fewstep.models.flux import Flux
from fewstep.models.flux_convert import to_diffusers

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[1] / "configs"
CACHE = CONFIGS / "cache/flux_dev.yaml"
TEACHER = CONFIGS / "teacher/flux_dev_pretrained.yaml"
STUDENT = CONFIGS / "student/lcm_flux_dev_lora.yaml"
FSDP = CONFIGS / "fsdp/flux.yaml"
LATENT_CHANNELS, CLIP_DIM, T5_LENGTH = 16, 24, 12  # FLUX.1's 16 latent channels
# FLUX.1-dev's scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler)
FLUX_DEV_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


def save_tiny_flux_dev(root: Path) -> Path:
    """A FLUX.1-dev layout written by FluxPipeline.save_pretrained: a guidance-embedded Flux on 16
    latent channels, a factor-4 VAE with FLUX.1's factors, tiny T5 and CLIP with tokenizers."""
    t5 = T5EncoderModel.from_pretrained(make_tiny_t5(root.parent / f"{root.name}-t5"))
    torch.manual_seed(0)
    net = Flux(
        in_channels=LATENT_CHANNELS,
        hidden_size=32,
        num_heads=2,
        depth=1,
        depth_single_blocks=1,
        context_in_dim=t5.config.d_model,
        vec_in_dim=CLIP_DIM,
        axes_dim=(4, 6, 6),
        guidance_embed=True,
    )
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)  # non-trivial (zero-initialised output layers otherwise)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        norm_num_groups=4,
        latent_channels=LATENT_CHANNELS,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
        vae=vae,
        text_encoder=make_tiny_clip(),
        tokenizer=make_tiny_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=make_tiny_tokenizer(),
        transformer=to_diffusers(net),
    ).save_pretrained(str(root))
    return root


@pytest.fixture(scope="module")
def flux_dev(tmp_path_factory) -> dict[str, Path]:
    """The tiny folder, 16 captioned 32 px shapes images and their cache built by
    configs/cache/flux_dev.yaml."""
    root = tmp_path_factory.mktemp("flux_dev")
    folder = save_tiny_flux_dev(root / "FLUX.1-dev")
    images = write_image_folder(ShapesWorld(size=16, resolution=32, seed=0), root / "images")
    cache = root / "cache"
    run(
        [
            "cache",
            "-c",
            str(CACHE),
            "--dataset.init_args.root",
            str(images),
            "--dataset.init_args.resolution=32",
            "--vae.init_args.pretrained_path",
            str(folder),
            "--text_encoder.init_args.path",
            str(folder),
            f"--text_encoder.init_args.max_length={T5_LENGTH}",
            "--out",
            str(cache),
            "--shard_size=8",
            "--batch_size=8",
            "--num_workers=0",
            "--device=cpu",
        ]
    )
    return {"root": root, "folder": folder, "cache": cache}


def teacher_copy(flux_dev: dict[str, Path]) -> Path:
    """configs/teacher/flux_dev_pretrained.yaml with the folder and VAE paths of the tiny folder
    (what a user's own paths do; the student reads its teacher from this file)."""
    config = yaml.safe_load(TEACHER.read_text())
    args = config["model"]["init_args"]
    args["network"]["init_args"]["path"] = str(flux_dev["folder"])
    args["vae_path"] = str(flux_dev["folder"] / "vae")
    copy = flux_dev["root"] / TEACHER.name
    copy.write_text(yaml.safe_dump(config))
    return copy


def cpu_args(flux_dev: dict[str, Path], out: Path) -> list[str]:
    """Overrides running a recipe YAML on one CPU (32-true precision) on the tiny cache."""
    return [
        "--trainer.accelerator=cpu",
        "--trainer.devices=1",
        "--trainer.precision=32-true",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.logger.init_args.save_dir",
        str(out),
        "--data.init_args.path",
        str(flux_dev["cache"]),
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.num_workers=0",
        "--data.init_args.pin_memory=false",
        f"--data.init_args.max_text_length={T5_LENGTH}",
        "--model.init_args.vae_path",
        str(flux_dev["folder"] / "vae"),
        "--model.init_args.val_num_samples=2",
    ]


def metrics_of(cli) -> dict[str, float]:
    """The CLI run's logged metrics as floats."""
    return {k: float(v) for k, v in cli.trainer.callback_metrics.items()}


def test_teacher_samples_on_flux_pipelines_1024px_grid():
    """28 Euler steps on RectifiedFlow(shift) walk the sigmas FluxPipeline gives its scheduler at
    1024 x 1024 (4096 packed latent tokens): linspace(1, 1/28, 28), dynamically shifted, then 0."""
    from fewstep.diffusion.schedules import RectifiedFlow

    args = yaml.safe_load(TEACHER.read_text())["model"]["init_args"]
    assert args["network"]["init_args"]["dtype"] == "bfloat16" and args["guidance_scale"] == 3.5
    steps = args["sampler"]["init_args"]["steps"]
    assert args["sampler"]["class_path"].endswith("Euler") and steps == 28
    tokens = (1024 // 16) ** 2  # 8x VAE, then 2x2 packing
    c = FLUX_DEV_SCHEDULER
    mu = calculate_shift(
        tokens, c["base_image_seq_len"], c["max_image_seq_len"], c["base_shift"], c["max_shift"]
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    scheduler.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)], mu=mu)
    process = RectifiedFlow(**args["process"]["init_args"])
    assert process.shift == pytest.approx(math.exp(mu), rel=1e-12)
    ours = process.timesteps(steps).float()
    torch.testing.assert_close(ours, scheduler.sigmas.float(), rtol=0, atol=1e-6)
    assert args["timestep_sampler"]["init_args"]["shift"] == process.shift


def test_cache_config_stores_flux_latents_t5_tokens_and_clip_pooled(flux_dev):
    cache = LatentCache(flux_dev["cache"])
    assert len(cache) == 16 and cache.has_array("pooled_text")
    assert cache.text_dim == 32 and cache.manifest["text_encoder"]["pooled"]["dim"] == CLIP_DIM
    assert cache.latent_shape == (LATENT_CHANNELS, 8, 8)  # 32 px through the factor-4 VAE


def test_teacher_config_validates_the_folder_one_pass_per_step(flux_dev, tmp_path):
    args = ["-c", str(teacher_copy(flux_dev)), *cpu_args(flux_dev, tmp_path)]
    args += ["--model.init_args.sampler.init_args.steps=2", "--trainer.limit_val_batches=1"]
    metrics = metrics_of(run(["validate", *args]))
    assert metrics["val/nfe"] == 2  # guidance 3.5 is an input: one pass per Euler step
    assert math.isfinite(metrics["val/loss"]) and metrics["val/loss"] > 0


def lora_parameter_count(net: torch.nn.Module, rank: int) -> int:
    """r (in + out) per adapted linear: the LoRA A [r, in] and B [out, r] of every block linear
    named in FLUX_TARGETS (Hu et al. 2022, eq. 3)."""
    from fewstep.models.lora import FLUX_TARGETS

    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in net.named_modules()
        if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in FLUX_TARGETS)
    )


def test_lora_student_fits_validates_and_exports(flux_dev, tmp_path):
    student = [
        "-c",
        str(STUDENT),
        *cpu_args(flux_dev, tmp_path),
        "--model.init_args.teacher_config",
        str(teacher_copy(flux_dev)),
        "--model.init_args.eval_steps=[1, 2]",
        "--model.init_args.teacher_sampler.init_args.steps=2",
    ]
    cli = run(["fit", *student, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"])
    teacher = cli.model.teacher
    assert cli.model.lora.rank == 64 and cli.model.lora.target_modules is None
    (ckpt,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    adapters = {k: v for k, v in saved.items() if k.startswith("student.")}
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert sum(v.numel() for v in adapters.values()) == lora_parameter_count(teacher, 64)
    assert not any(k.startswith("teacher.") for k in saved)  # referenced by sha256 only
    validated = metrics_of(run(["validate", *student, "--ckpt_path", str(ckpt)]))
    assert validated["val/teacher/nfe"] == 2  # one pass per step at guidance 3.5
    assert validated["val/student_1/nfe"] == 1 and validated["val/student_2/nfe"] == 2
    assert validated["val/student_1/latent_mse"] > 0
    fit_yaml = next(tmp_path.rglob("config.yaml"))
    out = ["--out", str(tmp_path / "pipe"), "--lora_out", str(tmp_path / "lora"), "--ema=false"]
    result = run(["export", "--config", str(fit_yaml), "--ckpt_path", str(ckpt), *out])
    assert result["kind"] == "flux" and (Path(result["lora"]) / LORA_FILE).is_file()
    pipe = Path(result["pipeline"])
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(pipe / "scheduler")
    assert scheduler.config.shift == cli.model.process.shift  # FluxPipeline's 1024 px shift
    call = json.loads((pipe / "fewstep_export.json").read_text())["pipeline_calls"]["4"]
    assert call["num_inference_steps"] == 4 and call["guidance_scale"] == 3.5


def test_student_with_the_fsdp_overlay_shards_a_rank_64_lora_run(capsys):
    """``-c lcm_flux_dev_lora.yaml -c configs/fsdp/flux.yaml``: an 8-GPU bf16-mixed FSDP run over
    the Flux blocks that keeps the LoRA settings and sets no norm clipping (Lightning's FSDP
    precision plugin refuses it)."""
    with pytest.raises(SystemExit):
        run(["fit", "-c", str(STUDENT), "-c", str(FSDP), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    trainer, model = printed["trainer"], printed["model"]["init_args"]
    strategy = trainer["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    blocks = {f"fewstep.models.flux_layers.{b}" for b in ("DoubleStreamBlock", "SingleStreamBlock")}
    assert set(strategy["init_args"]["auto_wrap_policy"]) == blocks
    assert set(strategy["init_args"]["activation_checkpointing_policy"]) == blocks
    assert trainer["precision"] == "bf16-mixed" and trainer["devices"] == 8
    assert trainer["gradient_clip_val"] is None and model["gradient_clip_val"] is None
    assert model["lora"] == {"rank": 64, "alpha": 64.0, "dropout": 0.0, "target_modules": None}
    assert model["method"]["class_path"].endswith("ConsistencyDistillation")
    assert model["sampler"] == {
        "class_path": "fewstep.diffusion.samplers.Euler",
        "init_args": {"steps": 4, "spacing": "trailing", "timesteps": None},
    }
    assert model["teacher_config"] == "configs/teacher/flux_dev_pretrained.yaml"
    assert printed["data"]["init_args"]["batch_size"] == 2
