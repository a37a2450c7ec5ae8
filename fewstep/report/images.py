"""The demo report's images: the teacher-vs-student grids read from the student's TensorBoard
events, the teacher's latest CFG grids, and the score-vs-NFE plot (matplotlib)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from fewstep.report.summary import BAR_NFE_REDUCTION, BAR_PERCENT, _num
from fewstep.utils.artifacts import CFG_FOLDER, CFG_PNG, latest_student_grids

# --- images --------------------------------------------------------------------------------------


def extract_grids(log_dir: Path | None, out_dir: Path) -> dict[int, str]:
    """Copy each step count's latest teacher-vs-student grid PNG (written by the student's
    validation under ``<log_dir>/teacher_vs_student/``) to ``report_grid_<n>steps.png``."""
    if log_dir is None or not Path(log_dir).is_dir():
        return {}
    names = {}
    for n, path in sorted(latest_student_grids(Path(log_dir)).items()):
        name = f"report_grid_{n}steps.png"
        try:
            with Image.open(path) as image:
                image.convert("RGB").save(out_dir / name)
        except Exception as err:  # a damaged file must not stop the report
            warnings.warn(
                f"report: grid for {n} steps ({path}) is not an image: {err}", stacklevel=2
            )
            continue
        names[n] = name
    return names


def teacher_cfg_grids(log_dir: Path | None) -> list[Path]:
    """The latest step's CFG grid PNGs in ``<log_dir>/cfg_eval``, by steps then scale."""
    folder = Path(log_dir) / CFG_FOLDER if log_dir is not None else None
    if folder is None or not folder.is_dir():
        return []
    found = [(m, p) for p in folder.glob("*.png") if (m := CFG_PNG.match(p.name))]
    if not found:
        return []
    last = max(int(m.group(1)) for m, _ in found)
    chosen = [
        (int(m.group(3)), _num(m.group(2)) or 0.0, p) for m, p in found if int(m.group(1)) == last
    ]
    return [p for _, _, p in sorted(chosen)]


BAR_GREEN, STUDENT_BLUE, TEACHER_RED = "#2a9d3a", "#1f5fbf", "#c0392b"


def plot_score_vs_nfe(
    teacher: tuple[float, float] | None, students: dict[int, tuple[float, float]], path: Path
) -> None:
    """GenEval overall against NFE (log x) with matplotlib: the teacher point, the student
    1/2/4 curve and the issue bar's region (>= 90 % of the teacher at >= 10x fewer NFE)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.6, 4.8), dpi=100)
    if teacher:
        edge, floor = teacher[0] / BAR_NFE_REDUCTION, BAR_PERCENT / 100 * teacher[1]
        ax.axvspan(0.5, edge, ymin=floor, ymax=1.0, color=BAR_GREEN, alpha=0.12, lw=0)
        ax.axhline(floor, color=BAR_GREEN, ls="--", label=f"{BAR_PERCENT:g} % of teacher")
        ax.axvline(edge, color=BAR_GREEN, ls=":", label=f"{BAR_NFE_REDUCTION:g}x fewer NFE")
        ax.plot(*teacher, "D", color=TEACHER_RED, ms=9, label=f"teacher: {teacher[1]:.3f}")
    ordered = sorted(students.items())
    if ordered:
        nfes, scores = zip(*(point for _, point in ordered), strict=True)
        ax.plot(nfes, scores, "o-", color=STUDENT_BLUE, lw=2, label="student")
        for n, (nfe, score) in ordered:
            ax.annotate(
                f"{n} step{'s' if n != 1 else ''}: {score:.3f}",
                (nfe, score),
                textcoords="offset points",
                xytext=(6, 6),
                color=STUDENT_BLUE,
            )
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 1, 2, 4 ... not 2^k
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("NFE per image (log scale)")
    ax.set_ylabel("GenEval-protocol overall")
    ax.set_title("GenEval-protocol score vs network evaluations")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_points(
    comp: dict[str, Any],
) -> tuple[tuple[float, float] | None, dict[int, tuple[float, float]]]:
    """(NFE, overall) of the teacher reference and of each student step count."""

    def point(row: dict[str, Any] | None) -> tuple[float, float] | None:
        if not row or row.get("geneval", {}).get("overall") is None or not row.get("nfe", 0) > 0:
            return None
        return row["nfe"], row["geneval"]["overall"]

    rows = comp["rows"]
    students = {
        int(k.removeprefix("student_")): point(r) for k, r in rows.items() if k != "teacher"
    }
    return point(rows.get("teacher")), {n: p for n, p in students.items() if p is not None}
