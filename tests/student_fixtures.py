"""Shared helpers for student (distillation) tests: a tiny teacher (fit YAML + Lightning checkpoint
with an EMA average), the tiny VAE and the tiny shapes cache it was trained on, and a CPU-sized
copy of any student YAML. Import as ``from student_fixtures import build_tiny_teacher``.

Sizes: 64 px shapes images, a factor-4 VAE with 8 latent channels (latents 8x16x16), the MiniLM
text encoder of configs/cache/shapes.yaml (384-wide text), a 1-block DiT with patch 4 (16 tokens).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import yaml

from fewstep.cli import run
from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.lightning.checkpoints import load_module
from fewstep.lightning.ema import EMA
from fewstep.models.vae import VAE

CONFIGS = Path(__file__).parents[1] / "configs"
LATENT_CHANNELS, LATENT_SIZE, TEXT_DIM = 8, 16, 384

TINY_DIT = {
    "class_path": "fewstep.models.dit.DiT",
    "init_args": {
        "in_channels": LATENT_CHANNELS,
        "patch_size": 4,
        "hidden_size": 32,
        "depth": 1,
        "num_heads": 2,
        "caption_channels": TEXT_DIM,
        "learn_sigma": False,
        "sample_size": LATENT_SIZE,
    },
}
PROCESSES: dict[str, dict[str, Any]] = {
    "flow": {  # rectified flow + velocity, as configs/teacher/shapes.yaml
        "process": {"class_path": "fewstep.diffusion.schedules.RectifiedFlow"},
        "prediction": "velocity",
        "sampler": {"class_path": "fewstep.diffusion.samplers.Euler", "init_args": {"steps": 2}},
        "learn_sigma": False,
    },
    "ddpm": {  # PixArt's discrete DDPM + epsilon with learned sigma
        "process": {"class_path": "fewstep.diffusion.schedules.DiscreteDDPM"},
        "prediction": "epsilon",
        "sampler": {"class_path": "fewstep.diffusion.samplers.DDIM", "init_args": {"steps": 2}},
        "learn_sigma": True,
    },
}


@dataclass(frozen=True)
class TinyTeacher:
    """Paths of a tiny trained teacher and the data it was trained on."""

    root: Path
    config: Path  # the teacher's fit YAML (model + data sections)
    ckpt: Path  # a Lightning checkpoint with the EMA callback's average
    cache: Path  # the latent cache (CachedLatentDataModule path)
    vae: Path  # the VAE folder the cache was encoded with
    kind: str  # "flow" or "ddpm"


def quiet_trainer(max_steps: int, root: Path | None = None, **kwargs: Any) -> pl.Trainer:
    """A CPU trainer without logger, checkpoints, progress bar, summary, sanity check or
    validation batches (each overridable through ``kwargs``)."""
    kwargs = {"logger": False, "enable_checkpointing": False, "limit_val_batches": 0, **kwargs}
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
        **kwargs,
    )


def build_tiny_vae(folder: Path) -> Path:
    """A random factor-4 VAE with 8 latent channels, saved at ``folder``."""
    torch.manual_seed(0)
    vae = VAE(block_out_channels=(8, 16, 16), norm_num_groups=4, latent_channels=LATENT_CHANNELS)
    vae.set_latent_scale(0.5, 0.0)
    vae.save_pretrained(folder)
    return folder


def build_tiny_cache(
    out: Path, vae_dir: Path, num_samples: int = 24, shard_size: int | None = None
) -> Path:
    """A shapes-world latent cache of ``num_samples`` 64 px images (about a second on CPU),
    in shards of ``shard_size`` (default: one shard)."""
    shard_size = shard_size or num_samples
    run(
        [
            "cache",
            "-c",
            str(CONFIGS / "cache/shapes.yaml"),
            "--out",
            str(out),
            "--device=cpu",
            "--vae.init_args.pretrained_path",
            str(vae_dir),
            f"--dataset.init_args.size={num_samples}",
            f"--shard_size={shard_size}",
            f"--batch_size={shard_size}",
        ]
    )
    return out


def teacher_yaml(cache: Path, vae_dir: Path, kind: Literal["flow", "ddpm"] = "flow") -> dict:
    """The fit config of a tiny teacher on ``cache``."""
    spec = PROCESSES[kind]
    dit_args = {**TINY_DIT["init_args"], "learn_sigma": spec["learn_sigma"]}
    network = {**TINY_DIT, "init_args": dit_args}
    return {
        "seed_everything": 0,
        "model": {
            "class_path": "fewstep.lightning.teacher_module.TeacherModule",
            "init_args": {
                "network": network,
                "process": spec["process"],
                "prediction": spec["prediction"],
                "sampler": spec["sampler"],
                "guidance_scale": 2.0,
                "vae_path": str(vae_dir),
                "val_num_samples": 4,
            },
        },
        "data": {
            "class_path": "fewstep.data.datamodule.CachedLatentDataModule",
            "init_args": {"path": str(cache), "batch_size": 4, "val_fraction": 0.25},
        },
    }


def train_tiny_teacher(config: Path, ckpt: Path, cache: Path, steps: int = 2) -> Path:
    """Train the teacher of ``config`` for a few steps (random non-zero init, EMA decay 0.5) and
    save a Lightning checkpoint at ``ckpt``."""
    pl.seed_everything(0, verbose=False)
    module = load_module(config)
    with torch.no_grad():
        for p in module.network.parameters():
            p.normal_(0.0, 0.05)  # the PixArt init zeroes the output: make the teacher non-trivial
    trainer = quiet_trainer(steps, callbacks=[EMA(decay=0.5)])
    data = CachedLatentDataModule(str(cache), batch_size=4, val_fraction=0.25)
    trainer.fit(module, data)
    trainer.save_checkpoint(ckpt)
    return ckpt


def build_tiny_teacher(
    root: Path, kind: Literal["flow", "ddpm"] = "flow", num_samples: int = 24
) -> TinyTeacher:
    """VAE + cache + teacher YAML + checkpoint under ``root`` (a few seconds on one CPU thread)."""
    root.mkdir(parents=True, exist_ok=True)
    vae_dir = build_tiny_vae(root / "vae")
    cache = build_tiny_cache(root / "cache", vae_dir, num_samples)
    config = root / f"teacher_{kind}.yaml"
    config.write_text(yaml.safe_dump(teacher_yaml(cache, vae_dir, kind)))
    ckpt = train_tiny_teacher(config, root / f"teacher_{kind}.ckpt", cache)
    return TinyTeacher(root, config, ckpt, cache, vae_dir, kind)


def cpu_student_config(
    path: Path, teacher: TinyTeacher, out_dir: Path, eval_steps: list[int] | None = None
) -> Path:
    """A copy of the student YAML ``path`` pointed at the tiny teacher, cache and VAE (and the
    teacher's own 2-step reference sampler), with CPU-sized data, validation and logging, written
    to ``out_dir``. Explicit student timesteps are cut to max(eval_steps) entries."""
    config = load_config(Path(path))
    args = config["model"].setdefault("init_args", {})
    args.update(
        teacher_config=str(teacher.config),
        teacher_ckpt=str(teacher.ckpt),
        vae_path=str(teacher.vae),
        val_num_samples=2,
        eval_steps=eval_steps or [1, 2],
    )
    args["teacher_sampler"] = PROCESSES[teacher.kind]["sampler"]  # fits the process, 2 steps
    if args.get("sampler"):
        sampler_args = args["sampler"].setdefault("init_args", {})
        if sampler_args.get("timesteps") is not None:
            sampler_args["timesteps"] = sampler_args["timesteps"][: max(eval_steps or [1, 2])]
    data = config["data"].setdefault("init_args", {})
    data.update(path=str(teacher.cache), batch_size=4, val_fraction=0.25, num_workers=0)
    data.pop("val_path", None)
    trainer = config.setdefault("trainer", {})
    trainer.update(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        default_root_dir=str(out_dir),
        limit_val_batches=1,
    )
    trainer.pop("strategy", None)
    logger = trainer.get("logger")
    if isinstance(logger, dict) and "init_args" in logger:
        logger["init_args"]["save_dir"] = str(out_dir)
    copy = out_dir / Path(path).name
    copy.write_text(yaml.safe_dump(config))
    return copy


def is_overlay(path: Path) -> bool:
    """An overlay (e.g. ``shapes_long.yaml``) names no model (fit) or dataset (cache) class: it
    is layered with ``-c`` on its ``base_config``."""
    raw = yaml.safe_load(path.read_text()) or {}
    sections = [raw.get(key) for key in ("model", "dataset")]  # fit / cache configs
    return any(isinstance(section, dict) and "class_path" not in section for section in sections)


def base_config(path: Path) -> Path:
    """The config an overlay is layered on: ``<name>_gpu.yaml`` -> ``<name>.yaml`` when that
    exists (e.g. a method's GPU overlay), else the folder's ``shapes.yaml``."""
    if path.stem.endswith("_gpu"):
        base = path.with_name(path.stem.removesuffix("_gpu") + ".yaml")
        if base.exists():
            return base
    return path.parent / "shapes.yaml"


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` layered on ``base`` as ``-c base -c over`` does: mappings merge key by key,
    everything else (lists included) is replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = deep_merge(out[key], value) if both else value
    return out


def load_config(path: Path) -> dict[str, Any]:
    """A YAML as a dict, layered on its base config when it is an overlay."""
    raw = yaml.safe_load(path.read_text()) or {}
    if not is_overlay(path):
        return raw
    return deep_merge(yaml.safe_load(base_config(path).read_text()), raw)


def header_chain(path: Path) -> list[Path]:
    """The config chain of the first ``# fewstep fit -c A -c B \\`` command (continuation lines
    included) in an overlay's leading comment, or [] when it names none ending with ``path``
    itself (the chain bench/reference_rebuild.sh runs)."""
    root = Path(__file__).resolve().parents[1]
    command = ""
    for line in path.read_text().splitlines():
        if not line.startswith("#") or (command and not command.endswith("\\")):
            break
        if command or line.startswith("# fewstep fit"):
            command += line.lstrip("# ")
    chain = [root / name for name in re.findall(r"-c ([^\s\\)]+)", command)]
    if not chain or chain[-1].resolve() != path.resolve() or not all(p.is_file() for p in chain):
        return []
    return chain


def overlay_chain(path: Path) -> list[Path]:
    """The chain its header names (``header_chain``), else ``path`` preceded by its base config
    when it is an overlay, and by that one's base when it is an overlay too
    (``shapes_reference_gpu.yaml`` layers on ``shapes_reference.yaml``, on ``shapes.yaml``)."""
    named = header_chain(path) if is_overlay(path) else []
    if named:
        return named
    chain = [path]
    while is_overlay(chain[0]) and len(chain) < 8:
        chain.insert(0, base_config(chain[0]))
    return chain


def config_args(path: Path) -> list[str]:
    """``-c`` arguments for ``path`` and the configs it layers on (``overlay_chain``)."""
    return [arg for p in overlay_chain(path) for arg in ("-c", str(p))]


def checkpoint_every(path: Path, steps: int, **trainer: Any) -> Path:
    """Rewrite the fit YAML at ``path`` so its ModelCheckpoint saves every ``steps`` training
    steps (and set any other ``trainer`` keys given); returns ``path``."""
    config = yaml.safe_load(path.read_text())
    config["trainer"].update(trainer)
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = steps
    path.write_text(yaml.safe_dump(config))
    return path


COUPLINGS_YAML = "configs/student/reflow_couplings_shapes.yaml"


def couplings_args(
    tiny: TinyTeacher,
    out: Path,
    *extra: str,
    config: str = COUPLINGS_YAML,
    num_samples: int = 12,
    shard: int = 4,
) -> list[str]:
    """`fewstep couplings` on a coupling YAML (default: the demo's), pointed at the tiny teacher
    (CPU; ``num_samples`` couplings in shards of ``shard``, one batch each)."""
    return [
        "couplings",
        "-c",
        str(CONFIGS.parent / config),
        "--teacher_config",
        str(tiny.config),
        "--teacher_ckpt",
        str(tiny.ckpt),
        "--cache",
        str(tiny.cache),
        "--out",
        str(out),
        f"--num_samples={num_samples}",
        f"--shard_size={shard}",
        f"--batch_size={shard}",
        "--device=cpu",
        "--progress=false",
        *extra,
    ]


def resolved_config(capsys: Any, *paths: Path) -> dict[str, Any]:
    """``fewstep fit -c p1 -c p2 ... --print_config`` as a dict (the CLI's own layering)."""
    from fewstep.cli import run

    capsys.readouterr()
    layered = [arg for path in paths for arg in ("-c", str(path))]
    try:
        run(["fit", *layered, "--print_config"])
    except SystemExit as stop:
        assert stop.code in (0, None), f"--print_config failed for {paths}"
    return yaml.safe_load(capsys.readouterr().out)


def tiny_teacher_args(tiny: TinyTeacher, tmp_path: Path) -> list[str]:
    """CLI overrides running a (layered) student config on the tiny teacher, on CPU, one batch."""
    model = {"teacher_config": tiny.config, "teacher_ckpt": tiny.ckpt, "vae_path": tiny.vae}
    return [
        *[f"--model.init_args.{key}={value}" for key, value in model.items()],
        f"--data.init_args.path={tiny.cache}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_fraction=0.25",
        "--data.init_args.num_workers=0",
        "--trainer.precision=32-true",
        "--trainer.accelerator=cpu",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.fast_dev_run=true",
    ]


TINY_FLUX = {
    "in_channels": LATENT_CHANNELS,
    "hidden_size": 32,
    "num_heads": 2,
    "depth": 1,
    "depth_single_blocks": 1,
    "context_in_dim": TEXT_DIM,
    "vec_in_dim": TEXT_DIM,  # the pooled vector is the mean of the MiniLM tokens
    "axes_dim": [4, 6, 6],
}


def flux_data(cache: Path) -> CachedLatentDataModule:
    """The tiny cache with the pooled vector as configs/teacher/flux_shapes.yaml derives it."""
    return CachedLatentDataModule(
        str(cache), batch_size=4, val_fraction=0.25, pooled_text="mean_tokens"
    )


def train_flux_teacher(root: Path, cache: Path, vae: Path, guidance_embed: bool) -> TinyTeacher:
    """configs/teacher/flux_shapes.yaml with a tiny network, trained 2 steps (EMA 0.5)."""
    config = yaml.safe_load((CONFIGS / "teacher/flux_shapes.yaml").read_text())
    network = config["model"]["init_args"]["network"]
    network["init_args"] = {**TINY_FLUX, "guidance_embed": guidance_embed}
    config["model"]["init_args"].update(vae_path=str(vae), val_num_samples=4)
    config["model"]["init_args"]["sampler"]["init_args"]["steps"] = 2
    config["data"]["init_args"].update(path=str(cache), batch_size=4, val_fraction=0.25)
    path = root / f"teacher_flux_{guidance_embed}.yaml"
    path.write_text(yaml.safe_dump(config))
    module = load_module(path)
    with torch.no_grad():
        for p in module.network.parameters():
            p.normal_(0.0, 0.05)  # non-trivial weights (zero-initialised output layers)
    trainer = quiet_trainer(2, callbacks=[EMA(decay=0.5)])
    trainer.fit(module, flux_data(cache))
    ckpt = root / f"teacher_flux_{guidance_embed}.ckpt"
    trainer.save_checkpoint(ckpt)
    return TinyTeacher(root, path, ckpt, cache, vae, "flow")
