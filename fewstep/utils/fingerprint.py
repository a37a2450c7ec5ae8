"""Stable fingerprints of networks (config + weights), stored in cache manifests and
checkpoints so that a mismatch between the data and the models is caught."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of a JSON-serialisable config, key order independent."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(module: nn.Module) -> str:
    """sha256 over parameter and buffer names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(module: nn.Module, config: dict[str, Any]) -> dict[str, str]:
    """{"config": ..., "weights": ...} hashes identifying a network."""
    return {"config": config_hash(config), "weights": weights_hash(module)}
