"""Loading trained modules from their fit YAML and Lightning checkpoint (safely: tensors and
plain containers only), with the EMA average applied: used by the student (its teacher), the
couplings tool and the exports."""

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

from fewstep.lightning.ema import EMA
from fewstep.utils.manifest import resolve_shipped_paths, verify_shipped

REQUIRED = ("network", "process", "prediction")  # what an exportable module must carry
STUDENT = ("student", "method", "sampler")  # a StudentModule carries these instead of network


def load_module(config: str | Path) -> pl.LightningModule:
    """Build the ``model:`` section of a LightningCLI YAML (trainer and data are ignored)."""
    path = Path(config).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: '{path}' (the YAML used for fewstep fit).")
    raw = resolve_shipped_paths(yaml.safe_load(path.read_text()), path)
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


def network_weights(ckpt_path: str | Path, ema: bool = True) -> dict[str, Any]:
    """The ``network.`` weights of a teacher checkpoint, the EMA average in place when ``ema``
    (an error if the checkpoint has none: nothing is substituted silently)."""
    ckpt = load_checkpoint(ckpt_path)
    prefix = "network."
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"'{ckpt_path}' holds no network.* weights: is it a teacher checkpoint?")
    if ema:
        state = ema_state(ckpt)
        if state is None:
            raise ValueError(
                f"'{ckpt_path}' has no EMA average; set init_weights_ema: false to start from "
                "its raw weights."
            )
        weights.update(state["shadow"])
    return weights


def graft_weights(network: nn.Module, ckpt_path: str | Path, ema: bool = True) -> list[str]:
    """Initialise ``network`` from a teacher checkpoint's weights. Every checkpoint weight must
    fit (name and shape); parameters the checkpoint lacks keep their initialisation (e.g. a
    zero-initialised module added to the trained network). Returns those parameters' names."""
    weights = network_weights(ckpt_path, ema)
    own = network.state_dict()
    unknown = sorted(set(weights) - set(own))
    wrong = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
    if unknown or wrong:
        raise ValueError(
            f"init_weights '{ckpt_path}' does not fit the network: unknown {unknown[:5]}, "
            f"different shapes {wrong[:5]}; use a checkpoint of the same network configuration."
        )
    missing = network.load_state_dict(weights, strict=False).missing_keys
    return sorted(missing)


class TeacherMismatchError(RuntimeError):
    """The teacher weights differ from those the student checkpoint was distilled from."""


def load_teacher(config: str, ckpt: str | None, use_ema: bool = True) -> pl.LightningModule:
    """The teacher LightningModule of a fit YAML (its ``model:`` section) with the checkpoint's
    weights, the EMA average in place when ``use_ema``; frozen (requires_grad False, eval).
    Without ``ckpt`` the config's network carries its own weights (e.g. a shipped teacher's
    ``PretrainedDiT``)."""
    if ckpt is None:
        verify_shipped(Path(config).parent)  # a shipped teacher: one clear error if changed
        return load_module(config).requires_grad_(False).eval()
    hint = "set model.init_args.use_teacher_ema=false to distill the raw trained weights."
    module, _, _ = load_trained(config, ckpt, use_ema, "StudentModule teacher_ckpt", hint)
    return module.requires_grad_(False).eval()
