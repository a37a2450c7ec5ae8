"""`fewstep export`: a trained teacher or distilled student (its fit YAML + a checkpoint) as a
diffusers ``PixArtSigmaPipeline`` folder, with the EMA weights when the checkpoint has them."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import ArgumentParser
from torch import nn

from fewstep.export.pixart_pipeline import (
    check_out_dir,
    export_pixart_sigma_pipeline,
    export_student_pipeline,
)
from fewstep.lightning.ema import EMA

REQUIRED = ("network", "process", "prediction")  # what an exportable module must carry
STUDENT = ("student", "method", "sampler")  # a StudentModule carries these instead of network


def load_module(config: str | Path) -> pl.LightningModule:
    """Build the ``model:`` section of a LightningCLI YAML (trainer and data are ignored)."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: '{path}' (the YAML used for fewstep fit).")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"'{path}' has no model: section with class_path/init_args.")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(pl.LightningModule, "model", required=True)
    try:
        parsed = parser.parse_object({"model": raw["model"]})
        module = parser.instantiate(parsed).model
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"Could not build the model of '{path}': {err}") from None
    except Exception as err:  # jsonargparse's ArgumentError and friends
        raise ValueError(f"Could not build the model of '{path}': {err}") from None
    required = REQUIRED if not is_student(module) else REQUIRED[1:]
    missing = [name for name in required if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"{type(module).__name__} from '{path}' cannot be exported: it has no {missing}."
        )
    return module


def is_student(module: nn.Module) -> bool:
    """Whether ``module`` is a distilled student (a StudentModule: student, method, sampler)."""
    return all(hasattr(module, name) for name in STUDENT)


def load_checkpoint(ckpt_path: str | Path) -> dict[str, Any]:
    """A full (single-file) Lightning checkpoint on CPU."""
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise ValueError(
            f"'{path}' is a sharded (distributed) checkpoint folder; export needs one file: train "
            "with FSDPStrategy(state_dict_type='full') or consolidate the shards first."
        )
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: '{path}'.")
    try:  # weights_only: a checkpoint is data; unpickling arbitrary objects could run code
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"Refusing to load '{path}': it holds objects other than tensors and plain "
            f"containers, which could run code when unpickled ({str(error).splitlines()[0]}). "
            "Use a checkpoint written by fewstep/Lightning."
        ) from None
    except (RuntimeError, OSError, EOFError) as error:
        raise ValueError(
            f"Cannot read checkpoint '{path}' (truncated or corrupt? {error}); use an intact copy "
            "or another checkpoint of the run."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"'{path}' is not a Lightning checkpoint (no state_dict).")
    return ckpt


def ema_state(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """The EMA callback's saved average in a checkpoint, or None."""
    found = [
        state
        for state in (ckpt.get("callbacks") or {}).values()
        if isinstance(state, dict) and isinstance(state.get("shadow"), dict)
    ]
    return found[0] if found else None


def apply_ema(module: pl.LightningModule, state: dict[str, Any]) -> None:
    """Copy the EMA average into the network it was taken of (``ema_target``)."""
    target: nn.Module = module.ema_target if hasattr(module, "ema_target") else module.network
    ema = EMA()
    ema.load_state_dict(state)
    try:
        ema.copy_to(target)
    except KeyError as err:
        raise ValueError(f"The checkpoint's EMA average does not fit the network: {err}") from None


def load_trained(
    config: str | Path,
    ckpt_path: str | Path,
    ema: bool = True,
    what: str = "Checkpoint",
    require_ema: str | None = None,
) -> tuple[pl.LightningModule, dict[str, Any], str]:
    """The module of fit YAML ``config`` with ``ckpt_path``'s weights, the EMA average in place
    when ``ema`` and the checkpoint has one; returns (module, checkpoint, "ema" | "raw").
    Without an average it warns, or raises with the hint ``require_ema`` when that is given."""
    module = load_module(config)
    ckpt = load_checkpoint(ckpt_path)
    module.on_load_checkpoint(ckpt)  # a student checks and restores its (unsaved) teacher
    try:
        module.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"{what} '{ckpt_path}' does not fit the model of '{config}': {err}"
        ) from None
    state = ema_state(ckpt) if ema else None
    if ema and state is None:
        if require_ema is not None:
            raise ValueError(f"{what} '{ckpt_path}' has no EMA average; {require_ema}")
        warnings.warn(f"'{ckpt_path}' has no EMA average; using the raw weights.", stacklevel=2)
    if state is not None:
        apply_ema(module, state)
    return module, ckpt, "raw" if state is None else "ema"


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


def export(
    config: str,
    ckpt_path: str,
    out: str,
    ema: bool = True,
    text_encoder_path: str | None = None,
    vae_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, str]:
    """Export a teacher or a distilled student (fit YAML ``config`` + ``ckpt_path``) as a
    PixArtSigmaPipeline folder at ``out``; ``ema`` uses the checkpoint's EMA average,
    ``text_encoder_path`` adds T5 + tokenizer (a pipeline folder or a model folder; default: the
    packaged MiniLM when it encoded the config's cache, see ``training_text_encoder``),
    ``vae_path`` overrides the config's VAE. A student gets the scheduler of its sampler."""
    check_out_dir(out, overwrite)  # fail before the slow part
    module, ckpt, weights = load_trained(config, ckpt_path, ema)
    why = "--text_encoder_path"
    if text_encoder_path is None:
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
        "text_encoder": {"path": text_encoder_path, "why": why},
    }
    if is_student(module):
        folder = _export_student(module, vae, out, text_encoder_path, overwrite, metadata)
        return {"pipeline": str(folder), "weights": weights, "kind": "student"}
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
        module.student,
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
