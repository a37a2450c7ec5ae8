"""`fewstep ship`: a trained teacher (fit YAML + checkpoint, EMA weights) as a shipped model
folder: a diffusers PixArt-Σ pipeline without text encoder (transformer/, vae/, scheduler/), a
``teacher.yaml`` that students load it from (no checkpoint needed), and a sha256 manifest with
the recipe, score and cost that produced it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fewstep.export.pixart_pipeline import export_pixart_sigma_pipeline
from fewstep.lightning.checkpoints import load_trained
from fewstep.utils.manifest import write_manifest

TEACHER_YAML = "teacher.yaml"


def shipped_teacher_yaml(config: str | Path, out: str | Path) -> dict[str, Any]:
    """The fit YAML's ``model:`` section with the network read from ``out`` (PretrainedDiT) and
    the VAE from ``out/vae``, both as absolute paths (so any working directory loads it);
    everything else (process, prediction, sampler, CFG) as trained."""
    raw = yaml.safe_load(Path(config).read_text())
    model = raw["model"]
    args = dict(model.get("init_args") or {})
    args["network"] = {  # relative to teacher.yaml's folder (manifest.resolve_shipped_paths)
        "class_path": "fewstep.models.pixart_io.PretrainedDiT",
        "init_args": {"path": "."},
    }
    args["vae_path"] = "vae"
    for key in ("optimizer", "lr_scheduler", "compile", "compile_kwargs"):
        args.pop(key, None)
    return {"model": {"class_path": model["class_path"], "init_args": args}}


def ship(
    config: str,
    ckpt_path: str,
    out: str,
    info: dict[str, Any] | None = None,
    ema: bool = True,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the shipped folder ``out`` for the teacher of fit YAML ``config`` at ``ckpt_path``
    (EMA weights by default); ``info`` (score, steps, time...) goes into the manifest."""
    module, ckpt, weights = load_trained(config, ckpt_path, ema)
    export_pixart_sigma_pipeline(
        module.network,
        module.vae_path,
        out,
        module.process,
        module.prediction,
        module.sampler,
        text_encoder_path=None,
        overwrite=overwrite,
        guidance_scale=module.guidance_scale,
    )
    teacher_yaml = shipped_teacher_yaml(config, out)
    (Path(out) / TEACHER_YAML).write_text(yaml.safe_dump(teacher_yaml, sort_keys=False))
    recipe = {"fit_config": yaml.safe_load(Path(config).read_text()), "weights": weights}
    manifest = {"recipe": recipe, "global_step": ckpt.get("global_step"), **(info or {})}
    write_manifest(out, manifest)
    return {"shipped": str(out), "weights": weights}
