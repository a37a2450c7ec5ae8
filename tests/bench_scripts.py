"""Import a script of bench/ (not a package) as a module, for the tests of the benchmarks and
tools kept there."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str) -> ModuleType:
    """``bench/<name>.py`` as the module ``name``, registered in ``sys.modules`` (dataclasses
    and pickling resolve names through it); ``forget_bench`` removes it."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def forget_bench(name: str) -> None:
    """Drop a ``load_bench`` module from ``sys.modules``."""
    sys.modules.pop(name, None)
