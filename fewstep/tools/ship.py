"""`fewstep ship`: a trained teacher (fit YAML + checkpoint, EMA weights) as a shipped model
folder: a diffusers pipeline without text encoder (transformer/, vae/, scheduler/; PixArt-Σ for
a DiT, FLUX.1 for an MMDiT), a ``teacher.yaml`` that students load it from (no checkpoint
needed), and a sha256 manifest with the recipe, score and cost that produced it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fewstep.export.flux_pipeline import export_flux_pipeline
from fewstep.export.pixart_pipeline import export_pixart_sigma_pipeline
from fewstep.lightning.checkpoints import load_trained
from fewstep.models.flux import Flux
from fewstep.tools.couplings import data_section_args
from fewstep.tools.export import latent_size
from fewstep.utils.manifest import manifest_info, write_manifest

TEACHER_YAML = "teacher.yaml"
LOADERS = {  # the network class that reads a shipped folder, by the trained network's family
    "pixart": "fewstep.models.pixart_io.PretrainedDiT",
    "flux": "fewstep.models.flux_io.PretrainedFlux",
}


def shipped_teacher_yaml(
    config: str | Path, out: str | Path, family: str = "pixart"
) -> dict[str, Any]:
    """The fit YAML's ``model:`` section with the network read from ``out`` (``LOADERS[family]``)
    and the VAE from ``out/vae``, both relative to the folder (resolved when loaded, so it may
    move); everything else (process, prediction, sampler, CFG) as trained. A teacher trained on
    a derived pooled text vector (``data.init_args.pooled_text``, e.g. an MMDiT's mean MiniLM
    token) keeps that setting in a ``data:`` section: whoever loads it needs the same vector."""
    raw = yaml.safe_load(Path(config).read_text())
    model = raw["model"]
    args = dict(model.get("init_args") or {})
    args["network"] = {"class_path": LOADERS[family], "init_args": {"path": "."}}
    args["vae_path"] = "vae"
    for key in ("optimizer", "lr_scheduler", "compile", "compile_kwargs"):
        args.pop(key, None)
    shipped: dict[str, Any] = {"model": {"class_path": model["class_path"], "init_args": args}}
    pooled = data_section_args(raw).get("pooled_text")
    if pooled not in (None, "cache"):
        shipped["data"] = {"init_args": {"pooled_text": pooled}}
    return shipped


def ship(
    config: str,
    ckpt_path: str,
    out: str,
    info: str | None = None,
    ema: bool = True,
    overwrite: bool = False,
) -> dict[str, str]:
    """Write the shipped folder ``out`` for the teacher of fit YAML ``config`` at ``ckpt_path``
    (EMA weights by default); ``info``, a JSON object (score, steps, time...), goes into the
    manifest verbatim."""
    module, ckpt, weights = load_trained(config, ckpt_path, ema)
    family = "flux" if isinstance(module.network, Flux) else "pixart"
    common = dict(text_encoder_path=None, overwrite=overwrite, guidance_scale=module.guidance_scale)
    trained = (module.network, module.vae_path, out, module.process, module.prediction)
    if family == "flux":  # no fixed size: the pipeline samples the latents it trained on
        export_flux_pipeline(*trained, module.sampler, latent_size(config), **common)
    else:
        export_pixart_sigma_pipeline(*trained, module.sampler, **common)
    teacher_yaml = shipped_teacher_yaml(config, out, family)
    (Path(out) / TEACHER_YAML).write_text(yaml.safe_dump(teacher_yaml, sort_keys=False))
    recipe = {"fit_config": yaml.safe_load(Path(config).read_text()), "weights": weights}
    manifest = {"recipe": recipe, "global_step": ckpt.get("global_step"), **manifest_info(info)}
    write_manifest(out, manifest)
    return {"shipped": str(out), "weights": weights}
