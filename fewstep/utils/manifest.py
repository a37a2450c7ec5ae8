"""Shipped model folders: a ``manifest.json`` beside the weights records the sha256 of every
file (and the recipe, score and cost that produced them); loading checks it, so a changed or
damaged file is one clear error instead of a silently different model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MARKER = "fewstep_shipped"  # manifest key that marks a shipped-model folder


class ShippedModelError(RuntimeError):
    """A shipped model's files do not match its manifest."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    """Every file under ``folder`` but the manifest, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: str | Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write ``folder/manifest.json``: the sha256 of each file plus ``info`` (recipe, score...)."""
    folder = Path(folder)
    files = {str(p.relative_to(folder)): sha256_file(p) for p in _files(folder)}
    manifest = {MARKER: 1, **info, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def manifest_info(info: str | None) -> dict[str, Any]:
    """The ``--info`` JSON object of a ship command, read verbatim (a YAML-reading CLI would turn a
    note such as ``"600 renders: varies by seed"`` into a mapping); one clear error otherwise."""
    if info is None:
        return {}
    try:
        parsed = json.loads(info)
    except ValueError as err:
        example = '{"score": 0.8}'
        raise SystemExit(f"--info is not JSON ({err}); give an object, e.g. '{example}'") from None
    if not isinstance(parsed, dict):
        raise SystemExit(f"--info must be a JSON object, got {type(parsed).__name__}")
    return parsed


def shipped_root(path: str | Path) -> Path | None:
    """The shipped-model folder holding ``path`` (itself or a parent), or None."""
    path = Path(path).resolve()
    for folder in (path, *path.parents):
        candidate = folder / MANIFEST
        if candidate.is_file():
            try:
                if MARKER in json.loads(candidate.read_text()):
                    return folder
            except (OSError, ValueError):
                continue
    return None


def verify_shipped(path: str | Path) -> dict[str, Any] | None:
    """If ``path`` lies in a shipped-model folder, check every file under ``path`` against the
    manifest's sha256 and return the manifest; None for an ordinary folder."""
    root = shipped_root(path)
    if root is None:
        return None
    manifest = json.loads((root / MANIFEST).read_text())
    scope = Path(path).resolve()
    for name, expected in manifest["files"].items():
        file = root / name
        if not file.resolve().is_relative_to(scope):
            continue
        if not file.is_file():
            raise ShippedModelError(f"Shipped model {root}: {name} is missing; {_FIX}")
        if (actual := sha256_file(file)) != expected:
            raise ShippedModelError(
                f"Shipped model {root}: {name} has sha256 {actual[:12]}..., the manifest "
                f"records {expected[:12]}...; {_FIX}"
            )
    return manifest


_FIX = "restore the folder (`git checkout -- <folder>` or reinstall fewstep)"


TEACHER_PATHS = (("network", "init_args", "path"), ("vae_path",))  # under model.init_args


def resolve_shipped_paths(raw: Any, config: str | Path) -> Any:
    """A shipped ``teacher.yaml`` (``raw``, read from ``config``) with its relative network and
    VAE paths resolved against its own folder, so the folder can move (e.g. be committed under
    fewstep/assets/) and load from any working directory; any other YAML is returned as is."""
    folder = Path(config).expanduser().resolve().parent
    if not isinstance(raw, dict) or shipped_root(folder) is None:
        return raw
    args = (raw.get("model") or {}).get("init_args") or {}
    for keys in TEACHER_PATHS:
        parent = args
        for key in keys[:-1]:
            parent = parent.get(key) if isinstance(parent.get(key), dict) else {}
        value = parent.get(keys[-1])
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            parent[keys[-1]] = str(folder / value)
    return raw
