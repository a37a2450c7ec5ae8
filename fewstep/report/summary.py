"""The demo report's figures as data: stage rows, VAE and teacher summaries, the
student-vs-teacher comparison and the issue-bar verdict, all read from ``results.json``
(written by ``fewstep.demo``). A missing stage or figure is "not run"; nothing raises."""

from __future__ import annotations

import math
import re
from typing import Any

from fewstep.data.prompts import CATEGORIES
from fewstep.utils.artifacts import FIDELITY_COLUMNS

STAGE_ORDER = ("shapes", "vae", "cache", "teacher", "student")
SKIPPED_STAGES = ("report",)  # the report itself: its figures are this file (or stale)
STUDENT_STEPS = (1, 2, 4)
BAR_STEPS, BAR_PERCENT, BAR_NFE_REDUCTION = 4, 90.0, 10.0
VAE_BAR = 0.95
NOT_RUN = "not run"
DASH = "–"
PLOT_NAME = "report_score_vs_nfe.png"
ROW_METRICS = ("nfe", "ms_per_image", "speedup", *(key for key, _, _ in FIDELITY_COLUMNS))
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
    shipped = f"shipped {stage['shipped']}: " if isinstance(stage.get("shipped"), str) else ""
    return f"{shipped}GenEval overall {overall} at NFE {nfe}"


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
    """``"<method>: "`` when the student stage recorded its distillation method (and the other
    methods it ran: ``"ladd (of lcm, ladd): "``)."""
    if not isinstance(stage.get("method"), str):
        return ""
    methods = stage.get("methods")
    others = list(methods) if isinstance(methods, dict) and len(methods) > 1 else []
    return f"{stage['method']} (of {', '.join(others)}): " if others else f"{stage['method']}: "


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
