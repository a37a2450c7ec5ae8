"""The method comparison on one teacher ("Methods on the same teacher", issue 15's bar): one row
per (distillation method, step count) with the same columns for every method, the best method
per step count and the 1-step bar, all read from ``results.json`` (``student.methods``, written
by ``fewstep.demo``). A missing method or figure is "not run"; nothing raises."""

from __future__ import annotations

from typing import Any

from fewstep.report.summary import EPS, FAITHFUL_MAX, NOT_RUN, STUDENT_STEPS, _num, _stage

BAR_STEPS, BAR_RATIO, BAR_BASELINE = 1, 0.85, "ladd"  # issue 15: 1 step >= 0.85x, FD <= LADD's
TEACHER_SPREAD = 1e-6  # teacher overall scores further apart than this: not the same reference
METRICS = ("nfe", "ms_per_image", "fd_teacher", "fd_data", "diversity")
BEST_RULE = (
    "highest prompt score among the students not marked not faithful "
    f"(≤ {FAITHFUL_MAX:.2f}× the teacher's score); ties go to the lower FD to the teacher"
)


def method_entries(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{method: entry}`` of the student stage: its ``methods`` map, or the single method an
    older demo recorded (``method`` + ``validate``)."""
    stage = _stage(results, "student") or {}
    methods = stage.get("methods")
    if isinstance(methods, dict):
        return {k: v for k, v in methods.items() if isinstance(v, dict)}
    if isinstance(stage.get("method"), str) and isinstance(stage.get("validate"), dict):
        return {stage["method"]: stage}
    return {}


def _key_figures(metrics: dict[str, Any], key: str) -> dict[str, float | None]:
    """Score (± SE) and the METRICS of one eval key (``teacher`` or ``student_<n>``)."""
    prefix = f"val/{key}/"
    out = {
        "score": _num(metrics.get(prefix + "geneval/overall")),
        "score_se": _num(metrics.get(prefix + "geneval/overall_se")),
    }
    return out | {m: _num(metrics.get(prefix + m)) for m in METRICS}


def _training_seconds(entry: dict[str, Any]) -> float | None:
    """The method's training cost: its fit plus any teacher sampling it needs (couplings)."""
    fit = _num(entry.get("fit_seconds"))
    extra = _num(entry.get("extra_seconds"))
    return None if fit is None else fit + (extra or 0.0)


def _student_row(
    method: str, n: int, entry: dict[str, Any], teacher: dict[str, Any]
) -> dict[str, Any]:
    """One (method, n steps) row: figures, ratio to the teacher, faithfulness, teacher diversity."""
    validate = entry.get("validate") if isinstance(entry.get("validate"), dict) else {}
    figures = _key_figures(validate, f"student_{n}")
    ran = any(v is not None for v in figures.values())
    row = {"method": method, "steps": n, "status": "done" if ran else NOT_RUN, **figures}
    row["teacher_diversity"] = teacher.get("diversity")
    row["training_seconds"] = _training_seconds(entry) if ran else None
    t_score, score = teacher.get("score"), figures["score"]
    row["ratio"] = score / t_score if score is not None and t_score else None
    row["faithful"] = None if row["ratio"] is None else row["ratio"] <= FAITHFUL_MAX + EPS
    return row


def _teacher_row(entries: dict[str, dict[str, Any]], results: dict[str, Any]) -> dict[str, Any]:
    """The teacher reference as the first method's validation measured it (all methods see the
    same one: ``spread`` is the largest difference of its score between methods)."""
    refs = [
        _key_figures(e.get("validate") or {}, "teacher")
        for e in entries.values()
        if isinstance(e.get("validate"), dict)
    ]
    refs = [r for r in refs if any(v is not None for v in r.values())]
    row: dict[str, Any] = dict(refs[0]) if refs else {m: None for m in ("score", *METRICS)}
    scores = [r["score"] for r in refs if r["score"] is not None]
    row["spread"] = max(scores) - min(scores) if len(scores) > 1 else 0.0
    teacher_stage = _stage(results, "teacher") or {}
    fit = _num(teacher_stage.get("fit_seconds", teacher_stage.get("reused_fit_seconds")))
    row["training_seconds"] = fit
    row["shipped"] = teacher_stage.get("shipped")
    return row


def method_table(results: dict[str, Any], methods: list[str] | None = None) -> dict[str, Any]:
    """Teacher reference, then a row per method (``methods``: the order, default as recorded)
    and step count (1, 2 and 4 for every method, plus any other that method validated); absent
    ones are "not run"."""
    entries = method_entries(results)
    order = list(methods) if methods is not None else list(entries)
    teacher = _teacher_row(entries, results)
    rows = [
        _student_row(m, n, entries.get(m, {}), teacher)
        for m in order
        for n in sorted(set(STUDENT_STEPS) | _validated_steps(entries.get(m, {})))
    ]
    has_scores = teacher["score"] is not None or any(r["score"] is not None for r in rows)
    notes = {m: e["note"] for m, e in entries.items() if isinstance(e.get("note"), str)}
    return {"teacher": teacher, "rows": rows, "has_scores": has_scores, "notes": notes}


def _validated_steps(entry: dict[str, Any]) -> set[int]:
    """The step counts a method's validation measured (``val/student_<n>/...`` keys)."""
    validate = entry.get("validate") or {}
    return {int(k.split("/")[1].removeprefix("student_")) for k in validate if _is_step(k)}


def _is_step(key: str) -> bool:
    """Whether a metric key is ``val/student_<n>/...``."""
    parts = key.split("/")
    return len(parts) > 2 and parts[1].startswith("student_") and parts[1][8:].isdigit()


def best_per_steps(table: dict[str, Any]) -> dict[int, str | None]:
    """The best method at each step count by BEST_RULE (None: no scored, faithful student)."""
    best: dict[int, str | None] = {}
    for n in sorted({r["steps"] for r in table["rows"]}):
        fair = [
            r
            for r in table["rows"]
            if r["steps"] == n and r["score"] is not None and r["faithful"] is not False
        ]
        fd = lambda r: r["fd_teacher"] if r["fd_teacher"] is not None else float("inf")  # noqa: E731
        fair.sort(key=lambda r: (-r["score"], fd(r)))
        best[n] = fair[0]["method"] if fair else None
    return best


def methods_bar(table: dict[str, Any]) -> dict[str, Any]:
    """Issue 15's bar: some method's 1-step score is ≥ 0.85× the teacher's with its FD to the
    teacher no worse than LADD's 1-step FD to the teacher."""
    rule = (
        f"a {BAR_STEPS}-step score ≥ {BAR_RATIO:g}× the teacher's with FD to the teacher "
        f"≤ {BAR_BASELINE.upper()}'s ({BAR_STEPS} step)"
    )
    rows = [r for r in table["rows"] if r["steps"] == BAR_STEPS]
    base = next((r for r in rows if r["method"] == BAR_BASELINE), None)
    if base is None or base["fd_teacher"] is None or table["teacher"]["score"] is None:
        missing = "the teacher's score" if table["teacher"]["score"] is None else None
        missing = missing or f"{BAR_BASELINE.upper()}'s {BAR_STEPS}-step FD to the teacher"
        text = f"**Methods bar ({rule}): not evaluated** — {missing} {NOT_RUN}."
        return {"rule": rule, "holds": None, "methods": [], "text": text}
    passing = [
        r["method"]
        for r in rows
        if r["ratio"] is not None
        and r["ratio"] >= BAR_RATIO - EPS
        and r["fd_teacher"] is not None
        and r["fd_teacher"] <= base["fd_teacher"] + EPS
    ]
    verdict = "holds" if passing else "fails"
    detail = f"met by {', '.join(passing)}" if passing else "no method meets it"
    text = (
        f"**Methods bar ({rule}): {verdict}** — {detail} "
        f"({BAR_BASELINE.upper()}'s FD to the teacher: {base['fd_teacher']:.2f})."
    )
    return {"rule": rule, "holds": bool(passing), "methods": passing, "text": text}
