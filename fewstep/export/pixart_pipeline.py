"""Diffusers ``PixArtSigmaPipeline`` folders out: transformer, VAE, a scheduler equivalent to our
(process, prediction, sampler) — a teacher's or a distilled student's few-step one — optionally
T5 + tokenizer, written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fewstep.diffusion.denoiser import Denoiser
from fewstep.diffusion.parameterization import PredictionType
from fewstep.diffusion.samplers import Sampler
from fewstep.diffusion.schedules import NoiseProcess
from fewstep.export.model_card import model_card
from fewstep.export.schedulers import (
    default_sampler,
    diffusers_scheduler,
    pipeline_call_kwargs,
    process_record,
    student_schedule,
)
from fewstep.models.dit import DiT
from fewstep.models.dit_convert import to_diffusers_components
from fewstep.models.pixart_io import text_encoder_folders
from fewstep.models.text_encoder import ENCODER_CLASSES, has_tokenizer
from fewstep.models.vae import VAE

EXPORT_RECORD = "fewstep_export.json"
EXPORT_FORMAT = "fewstep-pixart-sigma-export/1"


def check_out_dir(out: str | Path, overwrite: bool = False) -> Path:
    """``out`` as a Path, refusing an existing file or non-empty folder unless ``overwrite``."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Export target '{out}' is a file; choose another output folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Export target '{out}' exists and is not empty; choose another output folder or "
            "pass overwrite=True (fewstep export --overwrite true) to replace it."
        )
    return out


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` folder to ``out`` (replacing it only if ``overwrite``)."""
    check_out_dir(out, overwrite)  # someone may have written there meanwhile
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        tmp.rename(out)
        shutil.rmtree(old)
        return
    if out.is_dir():
        out.rmdir()
    tmp.rename(out)


def _autoencoder(vae: VAE | str | Path) -> Any:
    """The AutoencoderKL of a VAE (or a VAE folder) with its latent scale in the config."""
    vae = vae if isinstance(vae, VAE) else VAE.from_pretrained(vae)
    shift = float(vae.shift_factor)
    if not vae.has_latent_scale:
        warnings.warn(
            "Export: the VAE's latent scale was never measured; writing scaling_factor=1.0.",
            stacklevel=3,
        )
    if shift != 0.0:
        warnings.warn(
            f"Export: the VAE's shift_factor={shift:.4g} is non-zero but PixArtSigmaPipeline "
            "ignores it; decoded images will be wrong (latent outputs are fine).",
            stacklevel=3,
        )
    vae.autoencoder.register_to_config(scaling_factor=float(vae.scaling_factor), shift_factor=shift)
    return vae.autoencoder


def _text_components(path: str) -> tuple[Any, Any]:
    """(T5-style encoder, tokenizer) loaded from a local folder, pipeline root or text_encoder/."""
    import transformers
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    model_folder, tokenizer_folder = text_encoder_folders(path)
    if not has_tokenizer(tokenizer_folder):
        raise FileNotFoundError(
            f"No tokenizer files in '{tokenizer_folder}' for the text encoder at '{model_folder}'."
        )
    config = AutoConfig.from_pretrained(model_folder, local_files_only=True)
    name = ENCODER_CLASSES.get(config.model_type)
    cls = getattr(transformers, name) if name else AutoModel
    model = cls.from_pretrained(model_folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder, local_files_only=True)
    return model, tokenizer


def export_pixart_sigma_pipeline(
    dit: DiT,
    vae: VAE | str | Path,
    out_dir: str | Path,
    process: NoiseProcess,
    prediction: PredictionType,
    sampler: Sampler | None = None,
    text_encoder_path: str | None = None,
    overwrite: bool = False,
    guidance_scale: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a diffusers ``PixArtSigmaPipeline`` folder (transformer, vae, scheduler, and text
    encoder + tokenizer when given, else None so the pipeline takes ``prompt_embeds``) plus
    ``fewstep_export.json`` with the pipeline call arguments that reproduce ``sampler``."""
    out = check_out_dir(out_dir, overwrite)
    sampler = sampler if sampler is not None else default_sampler(process)
    scheduler = diffusers_scheduler(process, prediction, sampler)
    sample_size = int(dit.config()["sample_size"])
    call = pipeline_call_kwargs(scheduler, process, sampler, sample_size)
    if guidance_scale is not None:
        call["guidance_scale"] = float(guidance_scale)
    record = {
        "format": EXPORT_FORMAT,
        "process": process_record(process),
        "prediction": prediction,
        "sampler": repr(sampler),
        "pipeline_call": call,
        **(metadata or {}),
    }
    return _write_pipeline(dit, vae, out, scheduler, record, text_encoder_path, overwrite)


def _write_pipeline(
    dit: DiT,
    vae: VAE | str | Path,
    out: Path,
    scheduler: Any,
    record: dict[str, Any],
    text_encoder_path: str | None,
    overwrite: bool,
) -> Path:
    """Save the pipeline and ``record`` (as fewstep_export.json) to ``out`` atomically."""
    pipeline_class, model_class = pipeline_classes(dit)
    record["pipeline_class"] = f"{pipeline_class.__module__}.{pipeline_class.__name__}"
    transformer, refiner = to_diffusers_components(dit, model_class)
    text_encoder, tokenizer = (
        _text_components(text_encoder_path) if text_encoder_path is not None else (None, None)
    )
    refined = {} if refiner is None else {"text_refiner": _cpu_float32(refiner)}
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_autoencoder(vae),
        transformer=_cpu_float32(transformer),
        scheduler=scheduler,
        **refined,
    )
    return save_pipeline(pipe, record, out, overwrite)


def _cpu_float32(model: Any) -> Any:
    """A diffusers model on the CPU in float32, eval mode (cast only when needed: diffusers warns
    on every dtype cast)."""
    model = model.to("cpu")
    return (model if model.dtype == torch.float32 else model.to(torch.float32)).eval()


def pipeline_classes(dit: DiT) -> tuple[type, type]:
    """(pipeline class, transformer class) of a DiT: PixArtSigmaPipeline, or its guided
    (guidance-embedded student) and refined (text refiner) variants."""
    from diffusers import PixArtSigmaPipeline, PixArtTransformer2DModel

    from fewstep.export.guided_pixart import (
        GuidedPixArtSigmaPipeline,
        GuidedPixArtTransformer2DModel,
    )
    from fewstep.export.refined_pixart import (
        RefinedGuidedPixArtSigmaPipeline,
        RefinedPixArtSigmaPipeline,
    )

    guided, refined = dit.g_embedder is not None, dit.text_refiner is not None
    model_class = GuidedPixArtTransformer2DModel if guided else PixArtTransformer2DModel
    pipelines = {
        (False, False): PixArtSigmaPipeline,
        (True, False): GuidedPixArtSigmaPipeline,
        (False, True): RefinedPixArtSigmaPipeline,
        (True, True): RefinedGuidedPixArtSigmaPipeline,
    }
    return pipelines[guided, refined], model_class


def save_pipeline(pipe: Any, record: dict[str, Any], out: Path, overwrite: bool) -> Path:
    """Save ``pipe``, fewstep_export.json (``record``) and its model card into a temporary
    folder next to ``out``, then move it to ``out`` (nothing half-written is left there)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / EXPORT_RECORD).write_text(json.dumps(record, indent=2, default=str))
        (tmp / "README.md").write_text(model_card(record, record.get("eval_table")))
        _commit(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def export_student_pipeline(
    dit: DiT,
    vae: VAE | str | Path,
    out_dir: str | Path,
    denoiser: Denoiser,
    sampler: Sampler,
    steps: list[int] | None = None,
    text_encoder_path: str | None = None,
    overwrite: bool = False,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a distilled student as a ``PixArtSigmaPipeline`` folder whose scheduler reproduces
    ``sampler`` over ``denoiser`` (the method's ``student_denoiser``) at each of ``steps``
    (default: the sampler's), recording the pipeline call per step count in fewstep_export.json
    (``pipeline_calls``; ``pipeline_call`` is the sampler's own step count when exact)."""
    out = check_out_dir(out_dir, overwrite)
    sample_size = int(dit.config()["sample_size"])
    schedule = student_schedule(denoiser, sampler, steps or [sampler.steps], sample_size)
    default = sampler.steps if sampler.steps in schedule.calls else min(schedule.calls)
    record = {
        "format": EXPORT_FORMAT,
        "kind": "student",
        "process": process_record(denoiser.process),
        "prediction": denoiser.prediction,
        "sampler": repr(sampler),
        "pipeline_call": schedule.calls[default],
        "pipeline_calls": {str(n): call for n, call in schedule.calls.items()},
        "student": {"denoiser": type(denoiser).__name__, **schedule.notes},
        **(metadata or {}),
    }
    return _write_pipeline(dit, vae, out, schedule.scheduler, record, text_encoder_path, overwrite)
