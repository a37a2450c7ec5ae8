"""Read the weights of a local diffusers model folder (single file, shards or a variant), naming
the missing file when there is none; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS = "diffusion_pytorch_model"
VARIANTS = ("", ".fp16", ".bf16")


def weight_files(folder: Path, what: str) -> list[Path]:
    """The safetensors/bin files of a diffusers model folder; ``what`` names it in errors."""
    for variant in VARIANTS:
        index = folder / f"{WEIGHTS}{variant}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        for suffix in (".safetensors", ".bin"):
            file = folder / f"{WEIGHTS}{variant}{suffix}"
            if file.is_file():
                return [file]
    raise FileNotFoundError(
        f"No weights in the {what} folder '{folder}': expected '{folder / WEIGHTS}.safetensors', "
        "a sharded .safetensors.index.json, a .bin or an fp16/bf16 variant of them."
    )


def load_weights(folder: Path, what: str, dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """The diffusers-keyed state dict of a model folder, floating tensors cast to ``dtype`` shard
    by shard (so a bf16 checkpoint is never held twice in full)."""
    from safetensors.torch import load_file

    state: dict[str, Tensor] = {}
    for file in weight_files(folder, what):
        if not file.is_file():
            raise FileNotFoundError(
                f"{what} weight shard missing: '{file}' (listed in the folder's index.json)."
            )
        if file.suffix == ".safetensors":
            part = load_file(str(file))
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        state.update({k: v.to(dtype) if v.is_floating_point() else v for k, v in part.items()})
    return state


def assign_state(module: nn.Module, state: dict[str, Tensor], folder: Path | str) -> None:
    """Assign ``state`` to a meta-initialised ``module`` (strict, no copy): one error naming the
    ``folder`` whose weights do not fit its config."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"The weights in '{folder}' do not match its config.json: {err}") from None
