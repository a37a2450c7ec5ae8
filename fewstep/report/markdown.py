"""The demo report as markdown (``report.md``) and JSON (``report.json``): tables of stages,
VAE and teacher scores, the student-vs-teacher comparison with its warnings, and the images."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from fewstep.data.prompts import CATEGORIES
from fewstep.report.images import _plot_points, extract_grids, plot_score_vs_nfe, teacher_cfg_grids
from fewstep.report.methods import method_table
from fewstep.report.methods_md import methods_markdown, write_methods_table
from fewstep.report.summary import (
    DASH,
    FAITHFUL_MAX,
    NOT_RUN,
    PLOT_NAME,
    VAE_BAR,
    _fmt,
    bar_verdict,
    comparison,
    stage_rows,
    teacher_summary,
    vae_summary,
)
from fewstep.utils.artifacts import FIDELITY_COLUMNS
from fewstep.utils.atomic import write_text_atomic

# --- markdown ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _stage_md(rows: list[dict[str, Any]]) -> list[str]:
    """The stage table."""
    body = [
        [r["stage"], r["status"], _fmt(r["seconds"], ".1f"), r["key_figure"] or DASH] for r in rows
    ]
    total = sum(r["seconds"] or 0.0 for r in rows)
    body.append(["**total**", "", f"{total:.1f}", ""])
    return ["## Stages", "", *_table(["stage", "status", "seconds", "key figure"], body)]


def _scores_md(title: str, scores: dict[str, float] | None, column: str) -> list[str]:
    """A per-category accuracy table (or a "not run" row)."""
    if not scores:
        body = [[NOT_RUN, DASH]]
    else:
        body = [[c, _fmt(scores.get(c))] for c in CATEGORIES] + [
            ["**overall**", _fmt(scores.get("overall"))]
        ]
    return [f"## {title}", "", *_table(["category", column], body)]


def _vae_md(vae: dict[str, Any] | None) -> list[str]:
    """The VAE fidelity table and its bar."""
    lines = _scores_md(
        "VAE fidelity (scorer accuracy on reconstructions of held-out renders)",
        (vae or {}).get("reconstruction_geneval"),
        "accuracy",
    )
    if vae and vae["bar_holds"] is not None:
        verdict = "holds" if vae["bar_holds"] else "fails"
        overall = vae["reconstruction_geneval"]["overall"]  # 4 digits: 0.9497 shows as 0.950
        lines += ["", f"VAE bar (overall ≥ {VAE_BAR:g}): **{verdict}** ({overall:.4f})."]
    return lines


def _teacher_md(teacher: dict[str, Any] | None) -> list[str]:
    """The teacher's GenEval-protocol table."""
    lines = _scores_md(
        "Teacher GenEval-protocol scores", (teacher or {}).get("geneval"), "accuracy"
    )
    if teacher:
        lines += ["", f"NFE as logged by the teacher's validation: {_fmt(teacher['nfe'], '.0f')}."]
    return lines


COMPARE_HEADER = [
    "model",
    *CATEGORIES,
    "overall",
    "% of teacher",
    "NFE",
    "NFE reduction",
    "ms/image",
    "speed-up",
    *(title for _, title, _ in FIDELITY_COLUMNS),
]


def _score_cell(geneval: dict[str, float]) -> str:
    """The overall score with its standard error over prompts, when known."""
    cell = _fmt(geneval.get("overall"))
    se = geneval.get("overall_se")
    return cell if se is None else f"{cell} ± {se:.3f}"


def _compare_cells(name: str, row: dict[str, Any] | None) -> list[str]:
    """One row of the student-vs-teacher table."""
    if row is None:
        return [name, NOT_RUN, *[DASH] * (len(COMPARE_HEADER) - 2)]
    geneval = row["geneval"]
    return [
        name,
        *(_fmt(geneval.get(c)) for c in CATEGORIES),
        _score_cell(geneval),
        _fmt(row.get("percent_of_teacher"), ".1f", " %"),
        _fmt(row.get("nfe"), ".0f"),
        _fmt(row.get("nfe_reduction"), ".1f", "×"),
        _fmt(row.get("ms_per_image"), ".2f"),
        _fmt(row.get("speedup"), ".1f", "×"),
        *(_fmt(row.get(key), spec) for key, _, spec in FIDELITY_COLUMNS),
    ]


def unfaithful_lines(rows: dict[str, Any]) -> list[str]:
    """A warning per student scoring above FAITHFUL_MAX x its teacher, with the reason."""
    lines = []
    for key, row in rows.items():
        percent = (row or {}).get("percent_of_teacher")
        if key != "teacher" and percent is not None and percent > 100 * FAITHFUL_MAX:
            lines.append(
                f"- **{_student_name(key)}: not faithful to the teacher** — {percent:.0f} % of "
                f"the teacher's score (> {100 * FAITHFUL_MAX:.0f} %). A distilled student should "
                "match its teacher, not beat it: it has moved towards the data or another mode "
                "(compare its FD to the teacher and to the data)."
            )
    return ["", "### Warnings", "", *lines] if lines else []


def _student_name(key: str) -> str:
    """``student_<n>`` as "student <n> step(s)"."""
    n = int(key.removeprefix("student_"))
    return f"student {n} step{'s' if n != 1 else ''}"


def _compare_md(comp: dict[str, Any], bar: dict[str, Any]) -> list[str]:
    """The student-vs-teacher table, its source note and the bar verdict."""
    body = []
    for key, row in comp["rows"].items():
        name = "teacher (reference)" if key == "teacher" else _student_name(key)
        body.append(_compare_cells(name, row))
    source = comp["teacher_source"] or NOT_RUN
    return [
        "## Student vs teacher",
        "",
        *_table(COMPARE_HEADER, body),
        "",
        f"Teacher reference from: {source}. Latent MSE and PSNR compare each student sample with "
        "the teacher's sample from the same noise; FD is the Fréchet distance in shapes features "
        "(to the teacher's samples, and to the data); diversity is the mean pairwise feature "
        "distance over seeds of one prompt; ± is the standard error over prompts.",
        "",
        bar["text"],
        *unfaithful_lines(comp["rows"]),
    ]


def _link(path: Path, run_dir: Path) -> str:
    """``path`` relative to the report folder, with forward slashes."""
    return Path(os.path.relpath(path, run_dir)).as_posix()


def _grids_md(grids: dict[str, str], steps: list[int]) -> list[str]:
    """One subsection per student step count: its teacher-vs-student grid or "not run"."""
    lines = ["## Teacher vs student samples (same prompts and noise)"]
    for n in sorted(set(steps) | {int(k) for k in grids}):
        name, label = grids.get(str(n)), f"{n}-step student"
        body = f"![teacher vs {label}]({name})" if name else f"Grid: {NOT_RUN}."
        lines += ["", f"### {label}", "", body]
    return lines


def _images_md(images: dict[str, Any], steps: list[int]) -> list[str]:
    """The plot, the teacher-vs-student grids and the teacher's latest CFG grids."""
    plot = images["score_vs_nfe"]
    lines = ["## Score against NFE", ""]
    lines.append(f"![GenEval-protocol overall vs NFE]({plot})" if plot else f"Plot: {NOT_RUN}.")
    lines += ["", *_grids_md(images["grids"], steps), "", "## Teacher CFG grids (latest)", ""]
    for link in images["teacher_cfg_grids"]:
        lines += [f"![{Path(link).stem}]({link})", ""]
    if not images["teacher_cfg_grids"]:
        lines += [f"CFG grids: {NOT_RUN}.", ""]
    if images.get("student_eval_table"):
        table = images["student_eval_table"]
        lines += [f"Student validation table: [{table}]({table})"]
    return lines


# --- entry point ---------------------------------------------------------------------------------


def _clear_old_images(run_dir: Path) -> None:
    """Remove the images a previous report wrote (so nothing stale is linked)."""
    for path in [run_dir / PLOT_NAME, *run_dir.glob("report_grid_*steps.png")]:
        path.unlink(missing_ok=True)


def _student_eval_table(log_dir: Path | None, run_dir: Path) -> str | None:
    """Link to the newest ``eval_table.md`` the student validation wrote, if any."""
    if log_dir is None or not Path(log_dir).is_dir():
        return None
    tables = sorted(Path(log_dir).rglob("eval_table.md"), key=lambda p: p.stat().st_mtime)
    return _link(tables[-1], run_dir) if tables else None


def _images(
    run_dir: Path, comp: dict[str, Any], student_log_dir: Path | None, teacher_log_dir: Path | None
) -> dict[str, Any]:
    """Write the plot and the grids; their names relative to ``run_dir``."""
    _clear_old_images(run_dir)
    teacher, students = _plot_points(comp)
    plot = None
    if teacher or students:
        try:
            plot_score_vs_nfe(teacher, students, run_dir / PLOT_NAME)
            plot = PLOT_NAME
        except Exception as err:  # a drawing problem must not lose the tables
            warnings.warn(f"report: could not draw {PLOT_NAME}: {err}", stacklevel=2)
    grids = extract_grids(student_log_dir, run_dir)
    return {
        "score_vs_nfe": plot,
        "grids": {str(n): name for n, name in grids.items()},
        "teacher_cfg_grids": [_link(p, run_dir) for p in teacher_cfg_grids(teacher_log_dir)],
        "student_eval_table": _student_eval_table(student_log_dir, run_dir),
    }


def _method_order(results: dict[str, Any]) -> list[str] | None:
    """The methods the demo was asked for, in order (None: as recorded)."""
    stage = results.get("student")
    order = stage.get("methods_order") if isinstance(stage, dict) else None
    return [str(m) for m in order] if isinstance(order, list) else None


def build_report(
    run_dir: Path,
    results: dict[str, Any],
    student_log_dir: Path | None = None,
    teacher_log_dir: Path | None = None,
) -> dict[str, Any]:
    """All report figures as one JSON-able dict (writes the plot and grid PNGs)."""
    comp = comparison(results)
    return {
        "stages": stage_rows(results),
        "vae": vae_summary(results),
        "teacher": teacher_summary(results),
        "comparison": comp,
        "bar": bar_verdict(comp),
        "methods": method_table(results, _method_order(results)),
        "images": _images(run_dir, comp, student_log_dir, teacher_log_dir),
    }


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md`` text from ``build_report``'s dict."""
    steps = [
        int(k.removeprefix("student_")) for k in report["comparison"]["rows"] if k != "teacher"
    ]
    sections = [
        ["# fewstep demo report", "", report["bar"]["text"]],
        _stage_md(report["stages"]),
        _vae_md(report["vae"]),
        _teacher_md(report["teacher"]),
        _compare_md(report["comparison"], report["bar"]),
        methods_markdown(report["methods"]),
        _images_md(report["images"], steps),
    ]
    return "\n\n".join("\n".join(s) for s in sections).rstrip() + "\n"


def write_report(
    run_dir: Path,
    results: dict[str, Any],
    student_log_dir: Path | None = None,
    teacher_log_dir: Path | None = None,
) -> Path:
    """Write ``run_dir/report.md`` (+ ``report.json``, plot and grid PNGs); return its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = build_report(run_dir, results, student_log_dir, teacher_log_dir)
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    write_methods_table(run_dir, report["methods"])
    path = run_dir / "report.md"
    write_text_atomic(path, render_markdown(report))
    return path
