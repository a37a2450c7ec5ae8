"""The "Methods on the same teacher" section as markdown: the table (same columns for every
method at every step count), the notes that make it comparable, the best method per step count
and issue 15's bar. Also written alone as ``methods_table.md`` for the README."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fewstep.report.methods import BEST_RULE, TEACHER_SPREAD, best_per_steps, methods_bar
from fewstep.report.summary import DASH, FAITHFUL_MAX, NOT_RUN, _fmt
from fewstep.utils.atomic import write_text_atomic

TITLE = "Methods on the same teacher"
NO_SCORES = (
    "No prompt scores (the shapes scorer does not apply to this data): distribution measures only."
)
METHODS_TABLE = "methods_table.md"
SCORE_COLUMNS = ["prompt score ± SE", "× teacher"]
OTHER_COLUMNS = [
    "FD to teacher",
    "FD to data",
    "diversity (student / teacher)",
    "NFE",
    "ms/image",
    "training s",
]


def _score(row: dict[str, Any]) -> str:
    """Prompt score ± its standard error over prompts."""
    cell = _fmt(row["score"])
    return (
        cell
        if row["score"] is None or row["score_se"] is None
        else f"{cell} ± {row['score_se']:.3f}"
    )


def _ratio(row: dict[str, Any]) -> str:
    """Score ratio to the teacher, marked when the student is not faithful to it."""
    cell = _fmt(row.get("ratio"), ".2f", "×")
    return cell + " ⚠ not faithful" if row.get("faithful") is False else cell


def _cells(name: str, steps: str, row: dict[str, Any], scores: bool, teacher: bool) -> list[str]:
    """One table row (the teacher's ratio is 1×, its diversity stands alone)."""
    ratio = ("1.00×" if row["score"] is not None else DASH) if teacher else _ratio(row)
    diversity = _fmt(row["diversity"], ".2f")
    if not teacher:
        diversity = f"{diversity} / {_fmt(row.get('teacher_diversity'), '.2f')}"
    rest = [
        _fmt(row.get("fd_teacher"), ".2f"),
        _fmt(row["fd_data"], ".2f"),
        diversity,
        _fmt(row["nfe"], ".0f"),
        _fmt(row["ms_per_image"], ".2f"),
        _fmt(row["training_seconds"], ".0f"),
    ]
    return [name, steps, *([_score(row), ratio] if scores else []), *rest]


def _rows(table: dict[str, Any]) -> list[list[str]]:
    """The teacher reference, then each method's rows ("not run" where it did not validate)."""
    scores, teacher = table["has_scores"], table["teacher"]
    name = "teacher (shipped)" if teacher.get("shipped") else "teacher (reference)"
    body = [_cells(name, DASH, teacher, scores, teacher=True)]
    width = len(body[0])
    for row in table["rows"]:
        if row["status"] == NOT_RUN:
            body.append([row["method"], str(row["steps"]), NOT_RUN, *[DASH] * (width - 3)])
        else:
            body.append(_cells(row["method"], str(row["steps"]), row, scores, teacher=False))
    return body


def _notes(table: dict[str, Any]) -> list[str]:
    """What makes the rows comparable, and each method's own caveat."""
    spread = table["teacher"]["spread"]
    same = (
        f"every method's validation measured the same teacher score (largest difference "
        f"{spread:.3f})"
        if spread <= TEACHER_SPREAD
        else f"**the methods' teacher references differ by {spread:.3f}: their prompts, noise or "
        "teacher are not the same, so their rows are not comparable**"
    )
    lines = [
        f"All methods: the same validation code, held-out prompts, noise and teacher; {same}. "
        "FD is the Fréchet distance in the shipped shapes features to the teacher's samples from "
        "the same noise and to the data; diversity is the mean pairwise feature distance over "
        "seeds of one prompt (a drop against the teacher's shows mode collapse); training s is "
        "the fit plus any teacher sampling the method needs; ± is the standard error over "
        f"prompts. ⚠ not faithful: above {FAITHFUL_MAX:.2f}× the teacher's score — a student "
        "should match its teacher, not beat it."
    ]
    return lines + [f"- {method}: {note}" for method, note in table["notes"].items()]


def methods_markdown(table: dict[str, Any]) -> list[str]:
    """The section: table, notes, best method per step count (with the rule) and the bar."""
    header = ["method", "steps", *(SCORE_COLUMNS if table["has_scores"] else []), *OTHER_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(table)]
    lines += ["", *_notes(table), ""]
    if table["has_scores"]:
        best = best_per_steps(table)
        picks = ", ".join(
            f"{n} step{'s' if n != 1 else ''}: **{m or NOT_RUN}**" for n, m in best.items()
        )
        lines += [
            f"Best method per step count ({BEST_RULE}): {picks}.",
            "",
            methods_bar(table)["text"],
        ]
    else:
        lines += [NO_SCORES]
    return [f"## {TITLE}", "", *lines]


def write_methods_table(run_dir: Path, table: dict[str, Any]) -> Path:
    """Write the section alone to ``run_dir/methods_table.md`` (to paste into the README)."""
    path = Path(run_dir) / METHODS_TABLE
    write_text_atomic(path, "\n".join(methods_markdown(table)).rstrip() + "\n")
    return path
