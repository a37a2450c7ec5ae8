"""Real FLUX.1 diffusers folders in: ``PretrainedFlux(path)`` builds our Flux from a local
FLUX.1-dev (or -schnell) pipeline folder's ``transformer/`` with converted weights, and reads the
latent scaling and shift factors of its ``vae/`` (the FLUX.1 VAE normalises latents as
(z - shift) * scale)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fewstep.models.diffusers_weights import assign_state, load_weights
from fewstep.models.flux import Flux
from fewstep.models.flux_convert import flux_kwargs_from_diffusers_config, state_dict_from_diffusers
from fewstep.utils.manifest import verify_shipped

TRANSFORMER_CLASS = "FluxTransformer2DModel"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FIX = (
    "Point path at a local diffusers FLUX.1 pipeline folder (with transformer/ and vae/, e.g. "
    "models/FLUX.1-dev); nothing is downloaded."
)


def _read_json(file: Path, what: str) -> dict[str, Any]:
    """A config.json as a dict; a missing or unreadable file is one error naming it."""
    if not file.is_file():
        raise FileNotFoundError(f"FLUX.1 folder is missing the {what} config '{file}'. {_FIX}")
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read the {what} config '{file}': {err}") from None


def flux_root(path: str | Path) -> Path:
    """The pipeline folder (it must exist; its parts are checked where they are read)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"FLUX.1 folder not found: '{root}'. {_FIX}")
    return root


def flux_kwargs_from_folder(root: Path) -> dict[str, Any]:
    """``Flux`` init arguments from ``root/transformer/config.json``."""
    file = root / "transformer" / "config.json"
    config = _read_json(file, "transformer")
    if config.get("_class_name") != TRANSFORMER_CLASS:
        raise ValueError(
            f"'{file}' is not a FLUX.1 transformer config (_class_name="
            f"{config.get('_class_name')!r}, expected {TRANSFORMER_CLASS!r}). {_FIX}"
        )
    try:
        return flux_kwargs_from_diffusers_config(config)
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None


def vae_factors(root: Path, latent_channels: int) -> tuple[float, float]:
    """(scaling_factor, shift_factor) of ``root/vae/config.json``, checked against the
    transformer's latent channels (FLUX.1: 0.3611 and 0.1159, 16 channels)."""
    file = root / "vae" / "config.json"
    config = _read_json(file, "VAE")
    if config.get("latent_channels") != latent_channels:
        raise ValueError(
            f"'{file}' has latent_channels={config.get('latent_channels')}, but the transformer "
            f"takes {latent_channels} (its in_channels / 4). {_FIX}"
        )
    if "scaling_factor" not in config:
        raise ValueError(f"'{file}' has no scaling_factor; a FLUX.1 VAE config records it.")
    return float(config["scaling_factor"]), float(config.get("shift_factor") or 0.0)


class PretrainedFlux(Flux):
    """Our Flux with the architecture and weights of a local diffusers FLUX.1 folder's
    ``transformer/``; ``vae_scaling_factor``/``vae_shift_factor`` come from its ``vae/``.
    ``dtype``: the parameters' dtype (bfloat16 halves the 48 GB of float32 FLUX.1-dev)."""

    def __init__(
        self, path: str, dtype: str = "float32", gradient_checkpointing: bool = False
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"PretrainedFlux dtype={dtype!r}: use one of {sorted(DTYPES)}.")
        verify_shipped(path)  # a shipped folder must match its sha256 manifest
        root = flux_root(path)
        kwargs = flux_kwargs_from_folder(root)
        scale, shift = vae_factors(root, kwargs["in_channels"])
        folder = root / "transformer"
        try:
            state = state_dict_from_diffusers(
                load_weights(folder, "FLUX.1 transformer", DTYPES[dtype])
            )
        except ValueError as err:
            raise ValueError(f"FLUX.1 weights in '{folder}': {err}") from None
        with torch.device("meta"):  # skip the random init: every weight is loaded below
            super().__init__(**kwargs, gradient_checkpointing=gradient_checkpointing)
        assign_state(self, state, folder)
        self.path = str(path)
        self.vae_path = str(root / "vae")
        self.vae_scaling_factor, self.vae_shift_factor = scale, shift
