"""The demo report: stage, VAE, teacher and student-vs-teacher tables, the issue-bar verdict, a
GenEval-vs-NFE plot and teacher-vs-student grids, as ``report.md`` + ``report.json``.

Everything is read from ``results.json`` (written by ``fewstep.demo``), the student's TensorBoard
events (grids ``val/student_<n>/teacher_vs_student``) and the teacher's ``cfg_eval/*.png``.
A missing stage or figure is reported as "not run"; it never raises.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from fewstep.data.prompts import CATEGORIES

STAGE_ORDER = ("shapes", "vae", "cache", "teacher", "student")
SKIPPED_STAGES = ("report",)  # the report itself: its figures are this file (or stale)
STUDENT_STEPS = (1, 2, 4)
BAR_STEPS, BAR_PERCENT, BAR_NFE_REDUCTION = 4, 90.0, 10.0
VAE_BAR = 0.95
NOT_RUN = "not run"
DASH = "–"
PLOT_NAME = "report_score_vs_nfe.png"
GRID_TAG = re.compile(r"^val/student_(\d+)/teacher_vs_student$")
CFG_PNG = re.compile(r"^step(\d+)_scale([^_]+)_steps(\d+)\.png$")
ROW_METRICS = (
    "nfe",
    "ms_per_image",
    "speedup",
    "latent_mse",
    "psnr",
    "fd_teacher",
    "fd_data",
    "diversity",
)
FAITHFUL_MAX = 1.10  # a student above 1.10x its teacher's score is flagged as not faithful
EPS = 1e-9

# --- numbers -------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """``value`` as a finite float, else None (missing, NaN, not a number)."""
    if isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value: Any, spec: str = ".3f", suffix: str = "") -> str:
    """A number formatted with ``spec`` (+ suffix), or a dash when missing."""
    x = _num(value)
    return DASH if x is None else f"{format(x, spec)}{suffix}"


def _stage(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A stage's figures, None when it did not run."""
    entry = results.get(name)
    return entry if isinstance(entry, dict) else None


def _scores(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """``{category | "overall": accuracy}`` from the ``<prefix><category>`` entries."""
    if not isinstance(metrics, dict):
        return {}
    out = {}
    for name in (*CATEGORIES, "overall", "overall_se"):
        x = _num(metrics.get(prefix + name))
        if x is not None:
            out[name] = x
    return out


# --- sections as data ----------------------------------------------------------------------------


def vae_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """The VAE's reconstruction accuracy per category and its bar (overall >= 0.95)."""
    stage = _stage(results, "vae")
    scores = _scores((stage or {}).get("reconstruction_geneval") or {}, "")
    if not scores:
        return None
    overall = scores.get("overall")
    holds = None if overall is None else overall >= VAE_BAR - EPS
    return {"reconstruction_geneval": scores, "bar": VAE_BAR, "bar_holds": holds}


def teacher_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """The teacher stage's GenEval-protocol scores and NFE (as its validation logged them)."""
    stage = _stage(results, "teacher")
    metrics = (stage or {}).get("validate") or {}
    scores = _scores(metrics, "val/geneval/")
    if not scores:
        return None
    return {"geneval": scores, "nfe": _num(metrics.get("val/nfe"))}


def _student_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The student stage's validation metrics (empty when it did not run)."""
    validate = (_stage(results, "student") or {}).get("validate")
    return validate if isinstance(validate, dict) else {}


def _row(metrics: dict[str, Any], key: str) -> dict[str, Any] | None:
    """One eval key's (``teacher``, ``student_<n>``) figures, None when absent."""
    prefix = f"val/{key}/"
    geneval = _scores(metrics, prefix + "geneval/")
    values = {m: _num(metrics.get(prefix + m)) for m in ROW_METRICS}
    values = {m: v for m, v in values.items() if v is not None}
    if not geneval and not values:
        return None
    return {"geneval": geneval, **values}


def student_steps(metrics: dict[str, Any]) -> list[int]:
    """Step counts to report: 1, 2, 4 and any other the student validated."""
    found = {int(m.group(1)) for k in metrics if (m := re.match(r"^val/student_(\d+)/", k))}
    return sorted(set(STUDENT_STEPS) | found)


def _teacher_reference(results: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The teacher row to compare with, and where it comes from."""
    row = _row(_student_metrics(results), "teacher")
    if row is not None:
        return row, "student validation (same prompts and noise; CFG passes counted)"
    teacher = teacher_summary(results)
    if teacher is None:
        return None, None
    row = {"geneval": teacher["geneval"]}
    if teacher["nfe"] is not None:
        row["nfe"] = teacher["nfe"]
    return row, "teacher stage validation (NFE as logged there)"


def _reference_ratios(teacher: dict[str, Any]) -> None:
    """The teacher row's own ratios (100 %, 1x) where its base figure is present."""
    if teacher["geneval"].get("overall"):
        teacher["percent_of_teacher"] = 100.0
    if teacher.get("nfe"):
        teacher["nfe_reduction"] = 1.0
    if teacher.get("ms_per_image"):
        teacher["speedup"] = 1.0


def _relative(row: dict[str, Any], teacher: dict[str, Any] | None) -> None:
    """Add ``percent_of_teacher`` and ``nfe_reduction`` to a student row where computable."""
    if teacher is None:
        return
    overall, t_overall = row["geneval"].get("overall"), teacher["geneval"].get("overall")
    if overall is not None and t_overall:
        row["percent_of_teacher"] = 100.0 * overall / t_overall
    nfe, t_nfe = row.get("nfe"), teacher.get("nfe")
    if nfe and t_nfe is not None:
        row["nfe_reduction"] = t_nfe / nfe


def comparison(results: dict[str, Any]) -> dict[str, Any]:
    """Rows ``teacher`` and ``student_<n>`` (None = not run), and the teacher row's source."""
    metrics = _student_metrics(results)
    teacher, source = _teacher_reference(results)
    if teacher is not None:
        _reference_ratios(teacher)
    rows: dict[str, dict[str, Any] | None] = {"teacher": teacher}
    for n in student_steps(metrics):
        row = _row(metrics, f"student_{n}")
        if row is not None:
            _relative(row, teacher)
        rows[f"student_{n}"] = row
    return {"teacher_source": source, "rows": rows}


def bar_verdict(comp: dict[str, Any]) -> dict[str, Any]:
    """Whether the 4-step student keeps >= 90 % of the teacher's overall at >= 10x fewer NFE."""
    rows = comp["rows"]
    teacher, student = rows.get("teacher"), rows.get(f"student_{BAR_STEPS}")
    rule = (
        f"{BAR_STEPS}-step student GenEval overall ≥ {BAR_PERCENT:g} % of the teacher's "
        f"at ≥ {BAR_NFE_REDUCTION:g}× fewer NFE"
    )
    percent = (student or {}).get("percent_of_teacher")
    reduction = (student or {}).get("nfe_reduction")
    if teacher is None or student is None or percent is None or reduction is None:
        missing = [
            name
            for name, row in (
                ("teacher reference", teacher),
                (f"{BAR_STEPS}-step student", student),
            )
            if row is None
        ] or ["overall score or NFE"]
        text = f"**Issue bar ({rule}): not evaluated** — {', '.join(missing)} {NOT_RUN}."
        return {"rule": rule, "holds": None, "text": text}
    score_ok = percent >= BAR_PERCENT - EPS
    nfe_ok = reduction >= BAR_NFE_REDUCTION - EPS
    holds = score_ok and nfe_ok
    text = (
        f"**Issue bar ({rule}): {'holds' if holds else 'fails'}** — {BAR_STEPS}-step overall "
        f"{student['geneval']['overall']:.3f} = {percent:.1f} % of the teacher's "
        f"{teacher['geneval']['overall']:.3f} ({'≥' if score_ok else '<'} {BAR_PERCENT:g} %), "
        f"NFE {teacher['nfe']:.0f} → {student['nfe']:.0f} = {reduction:.1f}× fewer "
        f"({'≥' if nfe_ok else '<'} {BAR_NFE_REDUCTION:g}×)."
    )
    return {
        "rule": rule,
        "holds": holds,
        "score_holds": score_ok,
        "nfe_holds": nfe_ok,
        "percent_of_teacher": percent,
        "nfe_reduction": reduction,
        "text": text,
    }


def _shapes_figure(stage: dict[str, Any], results: dict[str, Any]) -> str:
    """Scorer accuracy on each kind of ground-truth render."""
    parts = [
        f"{k} {_fmt(v.get('overall'))}"
        for k, v in stage.items()
        if isinstance(v, dict) and "overall" in v
    ]
    return "scorer overall on renders: " + ", ".join(parts) if parts else DASH


def _vae_figure(stage: dict[str, Any], results: dict[str, Any]) -> str:
    """Scorer accuracy on VAE reconstructions."""
    overall = ((vae_summary(results) or {}).get("reconstruction_geneval") or {}).get("overall")
    return f"GenEval overall on reconstructions {_fmt(overall)}"


def _cache_figure(stage: dict[str, Any], results: dict[str, Any]) -> str:
    """Cached samples and shards."""
    samples, shards = _fmt(stage.get("samples"), ".0f"), _fmt(stage.get("shards"), ".0f")
    return f"{samples} samples in {shards} shards"


def _teacher_figure(stage: dict[str, Any], results: dict[str, Any]) -> str:
    """The teacher's overall score and NFE."""
    teacher = teacher_summary(results) or {"geneval": {}, "nfe": None}
    overall, nfe = _fmt(teacher["geneval"].get("overall")), _fmt(teacher["nfe"], ".0f")
    return f"GenEval overall {overall} at NFE {nfe}"


def _key_figure(name: str, stage: dict[str, Any], results: dict[str, Any]) -> str:
    """One line saying what a finished stage achieved."""
    figures = {
        "shapes": _shapes_figure,
        "vae": _vae_figure,
        "cache": _cache_figure,
        "teacher": _teacher_figure,
        "student": lambda stage, res: _method(stage) + _student_figure(comparison(res)),
    }
    return figures[name](stage, results) if name in figures else DASH


def _method(stage: dict[str, Any]) -> str:
    """``"<method>: "`` when the student stage recorded its distillation method."""
    return f"{stage['method']}: " if isinstance(stage.get("method"), str) else ""


def _student_figure(comp: dict[str, Any]) -> str:
    """The best-documented student row (4 steps if present) in one line."""
    present = [k for k, row in comp["rows"].items() if k != "teacher" and row is not None]
    if not present:
        return DASH
    key = f"student_{BAR_STEPS}" if f"student_{BAR_STEPS}" in present else present[-1]
    row = comp["rows"][key]
    steps = key.removeprefix("student_")
    return (
        f"{steps}-step GenEval overall {_fmt(row['geneval'].get('overall'))} "
        f"({_fmt(row.get('percent_of_teacher'), '.1f', ' %')} of teacher) "
        f"at NFE {_fmt(row.get('nfe'), '.0f')}"
    )


def stage_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage (the demo's five, then any other recorded): status, seconds, key figure."""
    known = (*STAGE_ORDER, *SKIPPED_STAGES)
    extra = [k for k, v in results.items() if k not in known and isinstance(v, dict)]
    rows = []
    for name in (*STAGE_ORDER, *extra):
        stage = _stage(results, name)
        if stage is None:
            rows.append({"stage": name, "status": NOT_RUN, "seconds": None, "key_figure": None})
            continue
        figure = _key_figure(name, stage, results)
        seconds = _num(stage.get("seconds"))
        reused = _num(stage.get("reused_fit_seconds"))
        status = "done" if reused is None else "done (earlier fit reused)"
        if reused is not None and seconds is not None:
            seconds += reused  # the stage's cost: the earlier fit plus this run's validation
        rows.append({"stage": name, "status": status, "seconds": seconds, "key_figure": figure})
    return rows


# --- images --------------------------------------------------------------------------------------


def _grid_events(path: Path) -> Iterator[tuple[int, Any]]:
    """``(n, image event)`` for every teacher-vs-student grid in one event file."""
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={IMAGES: 0})
    accumulator.Reload()
    for tag in accumulator.Tags().get("images", []):
        match = GRID_TAG.match(tag)
        if match:
            for event in accumulator.Images(tag):
                yield int(match.group(1)), event


def _latest_grids(log_dir: Path) -> dict[int, bytes]:
    """The encoded image of the latest (step, time) grid per step count under ``log_dir``."""
    latest: dict[int, tuple[tuple[int, float], bytes]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        try:
            for n, event in _grid_events(path):
                key = (event.step, event.wall_time)
                if n not in latest or key >= latest[n][0]:
                    latest[n] = (key, event.encoded_image_string)
        except Exception as err:  # a truncated or foreign file must not stop the report
            warnings.warn(f"report: skipping unreadable event file {path}: {err}", stacklevel=2)
    return {n: data for n, (_, data) in latest.items()}


def extract_grids(log_dir: Path | None, out_dir: Path) -> dict[int, str]:
    """Write each step count's latest grid as ``report_grid_<n>steps.png``; name per n."""
    if log_dir is None or not Path(log_dir).is_dir():
        return {}
    names = {}
    for n, data in sorted(_latest_grids(Path(log_dir)).items()):
        name = f"report_grid_{n}steps.png"
        try:
            Image.open(io.BytesIO(data)).convert("RGB").save(out_dir / name)
        except Exception as err:
            warnings.warn(f"report: grid for {n} steps is not an image: {err}", stacklevel=2)
            continue
        names[n] = name
    return names


def teacher_cfg_grids(log_dir: Path | None) -> list[Path]:
    """The latest step's CFG grid PNGs in ``<log_dir>/cfg_eval``, by steps then scale."""
    folder = Path(log_dir) / "cfg_eval" if log_dir is not None else None
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


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (bitmap default on old Pillow)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _dashed(
    draw: ImageDraw.ImageDraw, a: tuple[float, float], b: tuple[float, float], fill: str
) -> None:
    """A dashed straight line from ``a`` to ``b``."""
    length = math.dist(a, b)
    steps = max(1, int(length // 8))
    for i in range(0, steps, 2):
        t0, t1 = i / steps, min(1.0, (i + 1) / steps)
        p0 = (a[0] + (b[0] - a[0]) * t0, a[1] + (b[1] - a[1]) * t0)
        p1 = (a[0] + (b[0] - a[0]) * t1, a[1] + (b[1] - a[1]) * t1)
        draw.line([p0, p1], fill=fill, width=2)


class _Axes:
    """Pixel mapping for a log-x (NFE), linear-y (0..1 score) plot box."""

    def __init__(self, box: tuple[int, int, int, int], nfes: list[float]) -> None:
        self.box = box
        self.lo = math.log2(min(nfes)) - 0.6
        self.hi = math.log2(max(nfes)) + 0.6

    def x(self, nfe: float) -> float:
        """Pixel column of an NFE value (log scale)."""
        left, _, right, _ = self.box
        return left + (math.log2(nfe) - self.lo) / (self.hi - self.lo) * (right - left)

    def y(self, score: float) -> float:
        """Pixel row of a score in [0, 1]."""
        _, top, _, bottom = self.box
        return bottom - min(max(score, 0.0), 1.0) * (bottom - top)

    def x_ticks(self) -> list[int]:
        """Powers of two inside the x range."""
        return [2**k for k in range(math.ceil(self.lo), math.floor(self.hi) + 1) if k >= 0]


def _draw_frame(draw: ImageDraw.ImageDraw, axes: _Axes, font: Any) -> None:
    """Grid lines, ticks, tick labels and axis titles."""
    left, top, right, bottom = axes.box
    for k in range(6):
        score = k / 5
        y = axes.y(score)
        draw.line([(left, y), (right, y)], fill="#e4e4e4")
        draw.text((left - 8, y), f"{score:.1f}", fill="black", font=font, anchor="rm")
    for tick in axes.x_ticks():
        x = axes.x(tick)
        draw.line([(x, top), (x, bottom)], fill="#e4e4e4")
        draw.text((x, bottom + 6), str(tick), fill="black", font=font, anchor="mt")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text(
        ((left + right) / 2, bottom + 28),
        "NFE per image (log scale)",
        fill="black",
        font=font,
        anchor="mt",
    )
    draw.text((left, top - 8), "GenEval-protocol overall", fill="black", font=font, anchor="ls")


BAR_GREEN, STUDENT_BLUE, TEACHER_RED = "#2a9d3a", "#1f5fbf", "#c0392b"


def _draw_bar(
    draw: ImageDraw.ImageDraw, axes: _Axes, teacher: tuple[float, float], font: Any
) -> None:
    """The issue bar: shaded region (>= 90 % of the teacher, >= 10x fewer NFE) and its edges."""
    left, top, right, bottom = axes.box
    t_nfe, t_score = teacher
    y = axes.y(BAR_PERCENT / 100 * t_score)
    x = min(max(axes.x(t_nfe / BAR_NFE_REDUCTION), left + 1), right)
    draw.rectangle([left + 1, top + 1, x, max(y, top + 1)], fill="#e6f4e8")
    _dashed(draw, (left, y), (right, y), BAR_GREEN)
    _dashed(draw, (x, top), (x, bottom), BAR_GREEN)
    label = f"{BAR_PERCENT:g} % of teacher"
    draw.text((right - 4, y + 4), label, fill=BAR_GREEN, font=font, anchor="rt")
    label = f"{BAR_NFE_REDUCTION:g}x fewer NFE"
    draw.text((x + 4, top + 4), label, fill=BAR_GREEN, font=font, anchor="lt")


def _draw_points(
    draw: ImageDraw.ImageDraw,
    axes: _Axes,
    teacher: tuple[float, float] | None,
    students: dict[int, tuple[float, float]],
    font: Any,
) -> None:
    """The student curve (one dot per step count) and the teacher diamond, labelled."""
    ordered = sorted(students.items())
    points = [(axes.x(nfe), axes.y(score)) for _, (nfe, score) in ordered]
    if len(points) > 1:
        draw.line(points, fill=STUDENT_BLUE, width=3)
    for (n, (_, score)), (x, y) in zip(ordered, points, strict=True):
        draw.ellipse([x - 6, y - 6, x + 6, y + 6], fill=STUDENT_BLUE)
        label = f"{n} step{'s' if n != 1 else ''}: {score:.3f}"
        draw.text((x + 9, y + 6), label, fill=STUDENT_BLUE, font=font, anchor="lt")
    if teacher:
        x, y = axes.x(teacher[0]), axes.y(teacher[1])
        draw.polygon([(x, y - 8), (x + 8, y), (x, y + 8), (x - 8, y)], fill=TEACHER_RED)
        label = f"teacher (NFE {teacher[0]:g}): {teacher[1]:.3f}"
        draw.text((x + 4, y - 10), label, fill=TEACHER_RED, font=font, anchor="rb")


def plot_score_vs_nfe(
    teacher: tuple[float, float] | None, students: dict[int, tuple[float, float]], path: Path
) -> None:
    """GenEval overall against NFE (log x): the teacher point and the student 1/2/4 curve."""
    nfes = [p[0] for p in students.values()]
    if teacher:
        nfes += [teacher[0], teacher[0] / BAR_NFE_REDUCTION]  # keep the bar's edge in view
    image = Image.new("RGB", (760, 480), "white")
    draw = ImageDraw.Draw(image)
    font = _font(13)
    axes = _Axes((80, 60, 720, 400), nfes)
    title = "GenEval-protocol score vs network evaluations"
    draw.text((380, 14), title, fill="black", font=_font(16), anchor="mt")
    _draw_frame(draw, axes, font)
    if teacher:
        _draw_bar(draw, axes, teacher, font)
        draw.rectangle(axes.box, outline="black")
    _draw_points(draw, axes, teacher, students, font)
    legend = "blue: student; red: teacher; green: issue bar (student 4 steps should land inside)"
    draw.text((80, 446), legend, fill="#555555", font=font, anchor="lt")
    image.save(path)


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
        lines += ["", f"VAE bar (overall ≥ {VAE_BAR:g}): **{verdict}**."]
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
    "latent MSE",
    "PSNR (dB)",
    "FD to teacher",
    "FD to data",
    "diversity",
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
        _fmt(row.get("latent_mse"), ".4f"),
        _fmt(row.get("psnr"), ".2f"),
        _fmt(row.get("fd_teacher"), ".2f"),
        _fmt(row.get("fd_data"), ".2f"),
        _fmt(row.get("diversity"), ".2f"),
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
        _images_md(report["images"], steps),
    ]
    return "\n\n".join("\n".join(s) for s in sections).rstrip() + "\n"


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


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
    _write_atomic(run_dir / "report.json", json.dumps(report, indent=2, ensure_ascii=False))
    path = run_dir / "report.md"
    _write_atomic(path, render_markdown(report))
    return path
