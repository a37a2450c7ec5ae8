"""A fresh fit into a run folder that already holds a run (event files or checkpoints) moves
that run's files to ``<folder>/previous/<UTC time>/`` first: the new curves are not mixed into
the old ones, and nothing already written is lost. A resumed fit (``--ckpt_path``) keeps the
folder as it is."""

from __future__ import annotations

import time
from pathlib import Path

ARCHIVE = "previous"


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` has TensorBoard event files or a checkpoints folder."""
    if not folder.is_dir():
        return False
    events = any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
    return events or (folder / "checkpoints").is_dir()


def archive_previous_run(folder: str | Path) -> Path | None:
    """Move an earlier run's files out of ``folder`` (see the module docstring); where to."""
    folder = Path(folder)
    if not holds_a_run(folder):
        return None
    dest = folder / ARCHIVE / time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    suffix = 0
    while dest.exists():  # two fits within a second
        suffix += 1
        dest = dest.with_name(f"{dest.name.split('-')[0]}-{suffix}")
    dest.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name != ARCHIVE:
            entry.rename(dest / entry.name)
    return dest
