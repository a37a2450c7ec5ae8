"""`fewstep couplings`: (noise, teacher sample) pairs for rectified-flow distillation (Liu et al.
2022, Alg. 1), drawn with the teacher's guided ODE and stored in the latent-cache format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from fewstep.data.cache import LatentCache
from fewstep.data.cache_builder import describe_dataset
from fewstep.data.couplings import build_couplings
from fewstep.data.datamodule import PooledText, null_pooled, pooled_source
from fewstep.diffusion.samplers import Sampler
from fewstep.lightning.checkpoints import ema_state, load_checkpoint, load_teacher
from fewstep.lightning.sampling import NullText, as_null_text, generate
from fewstep.utils.fingerprint import weights_hash
from fewstep.utils.manifest import verify_shipped


def teacher_weights(config: str, ckpt_path: str | None, ema: bool) -> str:
    """What the couplings are drawn with: a checkpoint's "ema" (an error when it has no average)
    or "raw" weights, a shipped teacher's ("shipped:" + the weights it was shipped with), or
    "config" (``teacher_ckpt: null`` and a network that loads its own weights)."""
    if ckpt_path is None:
        manifest = verify_shipped(Path(config).expanduser().parent)
        if manifest is None:
            return "config"
        return f"shipped:{(manifest.get('recipe') or {}).get('weights', 'unknown')}"
    if ema and ema_state(load_checkpoint(ckpt_path)) is None:
        raise ValueError(
            f"teacher_ckpt '{ckpt_path}' has no EMA average; set use_ema: false (--use_ema "
            "false) to draw the couplings with its raw weights."
        )
    return "ema" if ema else "raw"


def data_args(config: str) -> dict[str, Any]:
    """``data.init_args`` of a fit YAML ({} if absent)."""
    return data_section_args(yaml.safe_load(Path(config).expanduser().read_text()) or {})


def data_section_args(raw: dict[str, Any]) -> dict[str, Any]:
    """``data.init_args`` of an already parsed fit YAML ({} if absent)."""
    data = raw.get("data") or {}
    return dict(data.get("init_args") or {})


def describe_sampler(sampler: Sampler) -> dict[str, Any]:
    """Class path and constructor arguments of a sampler (for the manifest)."""
    cls = type(sampler)
    args = sampler.init_args() if hasattr(sampler, "init_args") else describe_dataset(sampler)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **args}


def null_text(source: LatentCache, max_text_length: int | None, pooled: PooledText) -> NullText:
    """The null caption's valid tokens and, when the teacher gets pooled vectors, its pooled one
    (CFG's unconditional input, as the teacher's datamodule gives it)."""
    tokens = torch.as_tensor(source.null_text()[:max_text_length])
    mask = torch.ones(tokens.shape[0], dtype=torch.bool)
    return as_null_text((tokens, mask, null_pooled(source, pooled, max_text_length)))


def _device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def couplings(
    teacher_config: str = "configs/teacher/shapes.yaml",
    teacher_ckpt: str | None = "runs/demo/teacher/checkpoints/last.ckpt",
    out: str = "runs/demo/couplings",
    cache: str | None = None,
    num_samples: int | None = None,
    sampler: Sampler | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    shard_size: int = 1024,
    batch_size: int = 64,
    use_ema: bool = True,
    device: str = "auto",
    progress: bool = True,
) -> dict[str, str]:
    """Sample the teacher (fit YAML + checkpoint, EMA weights; or ``teacher_ckpt: null`` with a
    shipped teacher's ``teacher.yaml``) from seeded noise for the captions
    of source cache ``cache`` (default: the YAML's data.init_args.path), samples [0, num_samples),
    with its configured sampler and guidance scale unless given; rerunning resumes. A teacher
    taking a pooled text vector (Flux) gets it as its YAML's data.init_args.pooled_text makes it
    (with the null caption's for CFG's unconditional pass)."""
    source_path = cache or data_args(teacher_config).get("path")
    if source_path is None:
        raise ValueError(f"'{teacher_config}' has no data.init_args.path; pass --cache.")
    source = LatentCache(source_path)
    weights = teacher_weights(teacher_config, teacher_ckpt, use_ema)
    teacher = load_teacher(teacher_config, teacher_ckpt, use_ema)
    sampler = sampler if sampler is not None else teacher.sampler
    scale = float(teacher.guidance_scale if guidance_scale is None else guidance_scale)
    max_text_length = data_args(teacher_config).get("max_text_length")
    pooled = pooled_source(source, data_args(teacher_config).get("pooled_text", "cache"))
    null = null_text(source, max_text_length, pooled) if scale != 1.0 else None
    target = _device(device)
    teacher = teacher.to(target)

    def sample(
        text: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, cond: torch.Tensor | None
    ) -> torch.Tensor:
        with torch.inference_mode():
            return generate(teacher.denoiser, sampler, text, mask, noise, scale, null, cond=cond)

    info = {
        "teacher": {  # weights_sha256 = StudentModule.teacher_identity["sha256"] (same weights)
            "weights_sha256": weights_hash(teacher.network),
            "weights": weights,
            "prediction": teacher.prediction,
            "process": describe_dataset(teacher.process),
        },
        "sampler": describe_sampler(sampler),
        "guidance_scale": scale,
    }
    root = build_couplings(
        source,
        sample,
        out,
        info,
        num_samples,
        seed,
        shard_size,
        batch_size,
        max_text_length,
        target,
        progress,
        pooled,
    )
    return {"couplings": str(root), "teacher_weights": weights}
