"""Real PixArt-Σ diffusers folders in: ``PretrainedDiT(path)`` builds our DiT from a local pipeline
folder (``transformer/``, and ``text_refiner/`` when fewstep exported a DiT with a text refiner)
or a transformer folder, with converted weights;
``pipeline_vae_path`` / ``pipeline_text_encoder_path`` point the teacher's VAE and the cache's
text encoder at the same folder. (Out: ``fewstep.export.pixart_pipeline``.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep.models.diffusers_weights import assign_state, load_weights
from fewstep.models.dit import DiT
from fewstep.models.dit_convert import (
    dit_kwargs_from_diffusers_config,
    state_dict_from_diffusers,
    text_refiner_kwargs,
    text_refiner_state_from_diffusers,
)
from fewstep.models.text_encoder import resolve_folders
from fewstep.models.vae import config_folder, resolve_vae_folder
from fewstep.utils.manifest import verify_shipped

REFINER_FOLDER = "text_refiner"  # a refined pipeline's PixArtTextRefinerModel component
TRANSFORMER_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # the latter: legacy name
BINNED_SAMPLE_SIZES = (32, 64, 128, 256)  # PixArtSigmaPipeline's aspect-ratio bins exist for these
_FIX = (
    "Point it at a local diffusers PixArt-Σ pipeline folder (with transformer/, e.g. "
    "models/PixArt-Sigma-XL-2-1024-MS) or at its transformer/ folder; nothing is downloaded."
)


def resolve_transformer_folder(path: str | Path) -> Path:
    """The folder with the PixArt transformer ``config.json``: ``path`` or ``path/transformer``."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"PixArt folder not found: '{root}'. {_FIX}")
    found = config_folder(root, "transformer")
    if found is not None:
        return found
    raise FileNotFoundError(
        f"'{root}' holds no PixArt transformer: neither '{root / 'config.json'}' nor "
        f"'{root / 'transformer' / 'config.json'}' exists. {_FIX}"
    )


def read_transformer_config(folder: Path) -> dict[str, Any]:
    """The diffusers config of a PixArt transformer folder; anything else raises ValueError."""
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read the PixArt transformer config '{file}': {err}") from None
    name, norm = config.get("_class_name"), config.get("norm_type")
    if name not in TRANSFORMER_CLASSES or norm != "ada_norm_single":
        raise ValueError(
            f"'{file}' is not a PixArt transformer config (_class_name={name!r}, "
            f"norm_type={norm!r}; expected {' or '.join(TRANSFORMER_CLASSES)} with "
            f"norm_type='ada_norm_single'). {_FIX}"
        )
    return config


def dit_kwargs_from_folder(path: str | Path) -> dict[str, Any]:
    """``DiT`` init arguments for the PixArt transformer at ``path`` (pipeline or transformer)."""
    folder = resolve_transformer_folder(path)
    config = read_transformer_config(folder)
    if config.get("use_additional_conditions") is None and config.get("sample_size") == 128:
        config["use_additional_conditions"] = True  # diffusers' default at 1024 px (PixArt-α)
    try:
        return dit_kwargs_from_diffusers_config(config)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{folder / 'config.json'}: {err}") from None


def load_transformer_state_dict(folder: Path) -> dict[str, Tensor]:
    """The diffusers-keyed float32 state dict of a PixArt transformer folder."""
    return load_weights(folder, "PixArt transformer", torch.float32)


def text_refiner_folder(transformer_folder: Path) -> Path | None:
    """The ``text_refiner/`` beside a pipeline's ``transformer/`` folder, or None."""
    folder = transformer_folder.parent / REFINER_FOLDER
    is_pipeline = transformer_folder.name == "transformer"
    return folder if is_pipeline and (folder / "config.json").is_file() else None


def load_text_refiner(
    folder: Path, dit_kwargs: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(DiT init arguments, DiT state entries) of a ``text_refiner/`` component folder."""
    file = folder / "config.json"
    try:
        config = json.loads(file.read_text())
        kwargs = text_refiner_kwargs(config, dit_kwargs)
        state = text_refiner_state_from_diffusers(load_weights(folder, "text refiner"))
    except (OSError, json.JSONDecodeError, KeyError, ValueError) as err:
        raise ValueError(f"Cannot read the text refiner in '{folder}': {err}") from None
    return kwargs, state


class PretrainedDiT(DiT):
    """Our PixArt-Σ DiT with the architecture and weights of a local diffusers PixArt transformer
    (``path``: a pipeline folder with ``transformer/``, or the transformer folder itself), with
    the pipeline's ``text_refiner/`` when it has one."""

    def __init__(self, path: str, gradient_checkpointing: bool = False) -> None:
        verify_shipped(path)  # a shipped teacher must match its sha256 manifest
        kwargs = dit_kwargs_from_folder(path)
        folder = resolve_transformer_folder(path)
        try:
            state = state_dict_from_diffusers(load_transformer_state_dict(folder))
        except ValueError as err:
            raise ValueError(f"PixArt weights in '{folder}': {err}") from None
        if (refiner := text_refiner_folder(folder)) is not None:
            verify_shipped(refiner)  # also when ``path`` is the pipeline's transformer/ alone
            refiner_kwargs, refiner_state = load_text_refiner(refiner, kwargs)
            kwargs, state = kwargs | refiner_kwargs, state | refiner_state
        with torch.device("meta"):  # skip the random init: every weight is loaded below
            super().__init__(**kwargs, gradient_checkpointing=gradient_checkpointing)
        assign_state(self, state, folder)
        self.path = str(path)


def pipeline_vae_path(path: str | Path) -> str:
    """The AutoencoderKL folder of a pipeline (``path/vae``) or ``path`` itself (for vae_path)."""
    try:
        return str(resolve_vae_folder(path))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} {_FIX}") from None


def text_encoder_folders(path: str | Path) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder) for a model folder, a pipeline root, or its
    ``text_encoder/`` subfolder (whose tokenizer is the sibling ``tokenizer/``)."""
    return resolve_folders(str(path))


def pipeline_text_encoder_path(path: str | Path) -> str:
    """A ``TextEncoder(path=...)`` argument for a pipeline root or its ``text_encoder/`` folder."""
    model, tokenizer = text_encoder_folders(path)
    if model.name == "text_encoder" and tokenizer == model.parent / "tokenizer":
        return str(model.parent)  # TextEncoder resolves the pipeline layout from its root
    return str(model)
