"""Local weights for metric networks: one clear error when a folder or file is missing (nothing
is ever downloaded; docs/metrics.md lists the layout each metric expects)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

DOCS = "docs/metrics.md"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # either one, as transformers saves
HF_PREPROCESSOR = ("preprocessor_config.json", "processor_config.json")  # hub / transformers 5


class MissingWeightsError(FileNotFoundError):
    """A metric's local weights are absent or incomplete."""


def require_files(
    path: str | Path | None, expected: Sequence[str | tuple[str, ...]], metric: str
) -> Path:
    """``path`` as a Path after checking it holds every expected file (a tuple: any one of
    them); otherwise one MissingWeightsError naming the path and the files expected."""
    wanted = ", ".join(" or ".join(e) if isinstance(e, tuple) else e for e in expected)
    if path is None:
        raise MissingWeightsError(
            f"{metric}: no weights path given; set it to a local folder holding {wanted} "
            f"(layout: {DOCS})"
        )
    folder = Path(path).expanduser()
    missing = [
        e
        for e in expected
        if not any((folder / name).is_file() for name in (e if isinstance(e, tuple) else (e,)))
    ]
    if not folder.is_dir() or missing:
        absent = "the folder does not exist" if not folder.is_dir() else f"missing: {missing}"
        raise MissingWeightsError(
            f"{metric}: no usable weights at {folder} ({absent}); expected {wanted} there "
            f"(layout: {DOCS}; nothing is downloaded)"
        )
    return folder


def require_file(path: str | Path | None, metric: str, expected: str) -> Path:
    """``path`` as a Path after checking it is a file; otherwise one MissingWeightsError."""
    if path is None or not Path(path).expanduser().is_file():
        raise MissingWeightsError(
            f"{metric}: no weights file at {path}; expected {expected} (layout: {DOCS}; "
            "nothing is downloaded)"
        )
    return Path(path).expanduser()
