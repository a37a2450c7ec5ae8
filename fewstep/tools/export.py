"""`fewstep export`: a trained teacher or distilled student (its fit YAML + a checkpoint) as a
diffusers ``PixArtSigmaPipeline`` folder (a Flux network: ``FluxPipeline``), with the EMA weights
when the checkpoint has them; a LoRA student merged, and its adapters also on their own
(``--lora_out``: diffusers' and peft's LoRA formats)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml

from fewstep.export.flux_pipeline import export_flux_pipeline
from fewstep.export.lora import export_lora
from fewstep.export.pixart_pipeline import (
    check_out_dir,
    export_pixart_sigma_pipeline,
    export_student_pipeline,
)
from fewstep.lightning.checkpoints import is_student, load_trained
from fewstep.models.flux import Flux


def _training_cache(config: str | Path) -> Path | None:
    """The latent cache a fit YAML trains on (``data.init_args.path``), or None."""
    raw = yaml.safe_load(Path(config).expanduser().read_text()) or {}
    data = raw.get("data") if isinstance(raw.get("data"), dict) else {}
    path = (data.get("init_args") or {}).get("path")
    return Path(path) if isinstance(path, str) else None


def training_text_encoder(config: str | Path) -> tuple[str | None, str]:
    """(folder, why) of the text encoder whose embeddings the fit YAML's cache holds, when that is
    the packaged default (MiniLM): its weights hash equals the cache manifest's. Otherwise
    (None, why): the export then takes ``prompt_embeds`` unless --text_encoder_path is given."""
    from fewstep.data.cache import read_manifest
    from fewstep.models.text_encoder import TextEncoder, default_text_encoder_path

    cache = _training_cache(config)
    if cache is None or not (cache / "manifest.json").is_file():
        return None, f"no finished latent cache at data.init_args.path of '{config}'"
    recorded = read_manifest(cache).get("text_encoder", {}).get("fingerprint", {})
    try:
        default = default_text_encoder_path()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        return None, str(err)
    if TextEncoder(default).fingerprint()["weights"] != recorded.get("weights"):
        return None, f"the cache {cache} was encoded with another text encoder than the default"
    return default, f"the default text encoder, whose weights encoded the cache {cache}"


def run_eval_table(ckpt_path: str | Path) -> str | None:
    """The newest ``eval_table.md`` of the run a checkpoint belongs to (``<run>/checkpoints/``),
    for the model card; None when the run has none."""
    run_dir = Path(ckpt_path).expanduser().resolve().parent.parent
    tables = sorted(run_dir.glob("**/eval_table.md"), key=lambda p: p.stat().st_mtime)
    return tables[-1].read_text() if tables else None


def export(
    config: str,
    ckpt_path: str,
    out: str,
    ema: bool = True,
    text_encoder_path: str | None = None,
    vae_path: str | None = None,
    overwrite: bool = False,
    lora_out: str | None = None,
) -> dict[str, str]:
    """Export a teacher or a distilled student (fit YAML ``config`` + ``ckpt_path``) as a
    PixArtSigmaPipeline folder at ``out``; ``ema`` uses the checkpoint's EMA average,
    ``text_encoder_path`` adds T5 + tokenizer (a pipeline folder or a model folder; default: the
    packaged MiniLM when it encoded the config's cache, see ``training_text_encoder``),
    ``vae_path`` overrides the config's VAE. A student gets the scheduler of its sampler; a LoRA
    student is exported merged, and with ``lora_out`` its adapters are written there too."""
    check_out_dir(out, overwrite)  # fail before the slow part
    module, ckpt, weights = load_trained(config, ckpt_path, ema)
    lora = _export_adapters(module, lora_out, overwrite, weights) if lora_out else {}
    why = "--text_encoder_path"
    flux = isinstance(module.student if is_student(module) else module.network, Flux)
    if text_encoder_path is None and flux:
        why = "none given (--text_encoder_path: a FLUX.1 folder adds its CLIP and T5)"
    elif text_encoder_path is None:
        text_encoder_path, why = training_text_encoder(config)
    vae = vae_path or getattr(module, "vae_path", None)
    if vae is None:
        raise ValueError(
            f"'{config}' sets no model.init_args.vae_path; pass --vae_path (the VAE the latents "
            "were encoded with)."
        )
    metadata = {
        "source": {"config": str(config), "ckpt_path": str(ckpt_path), "weights": weights},
        "global_step": ckpt.get("global_step"),
        "eval_table": run_eval_table(ckpt_path),
        "text_encoder": {"path": text_encoder_path, "why": why},
    }
    if flux:
        folder = _export_flux(module, vae, out, config, text_encoder_path, overwrite, metadata)
        return {"pipeline": str(folder), "weights": weights, "kind": "flux", **lora}
    if is_student(module):
        folder = _export_student(module, vae, out, text_encoder_path, overwrite, metadata)
        return {"pipeline": str(folder), "weights": weights, "kind": "student", **lora}
    folder = export_pixart_sigma_pipeline(
        module.network,
        vae,
        out,
        module.process,
        module.prediction,
        sampler=getattr(module, "sampler", None),
        text_encoder_path=text_encoder_path,
        overwrite=overwrite,
        guidance_scale=getattr(module, "guidance_scale", None),
        metadata=metadata,
    )
    return {"pipeline": str(folder), "weights": weights}


def _export_student(
    module: pl.LightningModule,
    vae: str,
    out: str,
    text_encoder_path: str | None,
    overwrite: bool,
    metadata: dict[str, Any],
) -> Path:
    """The student network with the scheduler of its sampler at every evaluated step count."""
    method = module.method
    steps = sorted({*getattr(module, "eval_steps", []), module.sampler.steps})
    return export_student_pipeline(
        module.export_network(),
        vae,
        out,
        method.student_denoiser(module.models.student),
        module.sampler,
        steps=steps,
        text_encoder_path=text_encoder_path,
        overwrite=overwrite,
        metadata={
            **metadata,
            "method": type(method).__name__,
            "teacher": dict(getattr(module, "teacher_identity", {})),
        },
    )


def latent_size(config: str | Path) -> tuple[int, int]:
    """(h, w) of the latents in the fit YAML's cache (the Flux pipeline's height and width)."""
    from fewstep.data.cache import read_manifest

    cache = _training_cache(config)
    if cache is None or not (cache / "manifest.json").is_file():
        raise ValueError(
            f"Exporting a Flux network needs its latent size: no finished latent cache at "
            f"data.init_args.path of '{config}'; point it at the cache the model trained on."
        )
    _, h, w = read_manifest(cache)["latent_shape"]
    return int(h), int(w)


def _export_flux(
    module: pl.LightningModule,
    vae: str,
    out: str,
    config: str,
    text_encoder_path: str | None,
    overwrite: bool,
    metadata: dict[str, Any],
) -> Path:
    """A Flux teacher or Euler-sampled Flux student as a FluxPipeline folder."""
    student = is_student(module)
    steps = sorted({*getattr(module, "eval_steps", []), module.sampler.steps})
    extra = {}
    if student:
        teacher = dict(getattr(module, "teacher_identity", {}))
        extra = {"kind": "student", "method": type(module.method).__name__, "teacher": teacher}
    return export_flux_pipeline(
        module.export_network() if student else module.network,
        vae,
        out,
        module.process,
        module.prediction,
        module.sampler,
        latent_size(config),
        guidance_scale=module.guidance_scale,
        steps=steps,
        text_encoder_path=text_encoder_path,
        overwrite=overwrite,
        metadata={**metadata, **extra},
    )


def _export_adapters(
    module: pl.LightningModule, out: str, overwrite: bool, weights: str
) -> dict[str, str]:
    """A LoRA student's adapters (of the ``weights``: EMA or raw) as a LoRA folder at ``out``."""
    if getattr(module, "lora", None) is None:
        raise ValueError(
            "fewstep export --lora_out: this checkpoint is not a LoRA student (its model sets no "
            "lora); export the pipeline only."
        )
    trained = [n for n, p in module.student.named_parameters() if p.requires_grad]
    extra = [n for n in trained if ".lora_" not in n]
    if extra:
        raise ValueError(
            f"fewstep export --lora_out: the student also trained non-LoRA parameters "
            f"{extra[:4]} (e.g. a guidance embedding), which a LoRA file cannot hold; export "
            "the merged pipeline only."
        )
    metadata = {"weights": weights, "teacher": dict(module.teacher_identity)}
    metadata["student_base"] = dict(module.student_base)
    folder = export_lora(module.student, out, overwrite, metadata)
    return {"lora": str(folder)}
