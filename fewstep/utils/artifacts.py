"""The names under which validation writes its images and the demo report finds them: one
contract for writers (fewstep.lightning) and readers (fewstep.report)."""

from __future__ import annotations

import re
from pathlib import Path

CFG_FOLDER = "cfg_eval"  # <log_dir>/cfg_eval/step<step>_scale<s>_steps<n>.png (teacher)
GRID_FOLDER = "teacher_vs_student"  # <log_dir>/teacher_vs_student/step<step>_<n>steps.png
CFG_PNG = re.compile(r"^step(\d+)_scale([^_]+)_steps(\d+)\.png$")
GRID_PNG = re.compile(r"^step(\d+)_(\d+)steps\.png$")
# Fidelity columns of the student-vs-teacher tables (eval_table.md and the demo report):
# (metric key, column title, format)
FIDELITY_COLUMNS = (
    ("latent_mse", "latent MSE", ".4f"),
    ("psnr", "PSNR (dB)", ".2f"),
    ("fd_teacher", "FD to teacher", ".2f"),
    ("fd_data", "FD to data", ".2f"),
    ("kid_teacher", "KID to teacher", ".4f"),
    ("kid_data", "KID to data", ".4f"),
    ("diversity", "diversity", ".2f"),
)


def cfg_grid_name(step: int, scale: float, steps: int) -> str:
    """File name of a teacher CFG grid."""
    return f"step{step:07d}_scale{scale:g}_steps{steps}.png"


def student_grid_name(step: int, steps: int) -> str:
    """File name of a teacher-vs-student grid at ``steps`` student steps."""
    return f"step{step:07d}_{steps}steps.png"


def latest_student_grids(log_dir: Path) -> dict[int, Path]:
    """The newest (highest step) teacher-vs-student grid PNG per step count under ``log_dir``."""
    latest: dict[int, tuple[int, Path]] = {}
    for path in Path(log_dir).rglob(f"{GRID_FOLDER}/*.png"):
        match = GRID_PNG.match(path.name)
        if match:
            step, n = int(match.group(1)), int(match.group(2))
            if n not in latest or step >= latest[n][0]:
                latest[n] = (step, path)
    return {n: path for n, (_, path) in latest.items()}
