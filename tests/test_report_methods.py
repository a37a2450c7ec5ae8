"""The "Methods on the same teacher" table: one row per method and step count, the same columns
for all, ratios to the teacher, the best faithful method per step count and issue 15's bar."""

from __future__ import annotations

import json

import pytest

from fewstep.report import write_report
from fewstep.report.methods import best_per_steps, method_table, methods_bar
from fewstep.report.methods_md import METHODS_TABLE, TITLE, methods_markdown

TEACHER = {"score": 0.80, "se": 0.02, "nfe": 40.0, "ms": 120.0, "fd_data": 3.0, "div": 5.0}


def validation(students: dict[int, dict[str, float]], teacher_score: float = 0.80) -> dict:
    """StudentModule-style metrics: the teacher reference and the given student step counts."""
    m = {
        "val/teacher/geneval/overall": teacher_score,
        "val/teacher/geneval/overall_se": TEACHER["se"],
        "val/teacher/nfe": TEACHER["nfe"],
        "val/teacher/ms_per_image": TEACHER["ms"],
        "val/teacher/fd_data": TEACHER["fd_data"],
        "val/teacher/diversity": TEACHER["div"],
    }
    for n, figures in students.items():
        m |= {f"val/student_{n}/{k}": v for k, v in figures.items()}
    return m


def student(score: float, fd_teacher: float, n: int) -> dict[str, float]:
    """One step count's figures."""
    return {
        "geneval/overall": score,
        "geneval/overall_se": 0.03,
        "fd_teacher": fd_teacher,
        "fd_data": fd_teacher + 1.0,
        "diversity": 4.0,
        "nfe": float(n),
        "ms_per_image": 3.0 * n,
    }


def results(**methods: dict) -> dict:
    """results.json with the student stage's ``methods`` map (lcm, ladd, dmd2 asked; given ones
    validated)."""
    return {
        "teacher": {"validate": {"val/geneval/overall": 0.81}, "fit_seconds": 900.0},
        "student": {
            "method": "ladd",
            "validate": methods.get("ladd", {}).get("validate", {}),
            "methods": methods,
            "methods_order": ["lcm", "ladd", "dmd2", "reflow"],
        },
    }


@pytest.fixture
def three_methods() -> dict:
    """LCM (faithful, weaker), LADD (1 step 0.70), DMD2 (1 step 0.72 at a lower FD, 4 steps above
    1.10x the teacher) — reflow asked for but not run; DMD2 did not measure FD to data at 2."""
    dmd2 = validation(
        {1: student(0.72, 2.0, 1), 2: student(0.78, 1.5, 2), 4: student(0.95, 1.0, 4)}
    )
    del dmd2["val/student_2/fd_data"]
    return results(
        lcm={
            "validate": validation({n: student(0.5 + 0.05 * n, 4.0, n) for n in (1, 2, 4)}),
            "fit_seconds": 100.0,
        },
        ladd={
            "validate": validation({n: student(0.7, 3.0 / n, n) for n in (1, 2, 4)}),
            "fit_seconds": 200.0,
        },
        dmd2={"validate": dmd2, "fit_seconds": 300.0, "extra_seconds": 50.0, "note": "two nets"},
    )


def rows_by(table: dict) -> dict[tuple[str, int], dict]:
    return {(r["method"], r["steps"]): r for r in table["rows"]}


def test_same_columns_for_every_method_ratio_and_missing_figures(three_methods):
    table = method_table(three_methods, ["lcm", "ladd", "dmd2", "reflow"])
    rows = rows_by(table)
    assert list(dict.fromkeys(r["method"] for r in table["rows"])) == [
        "lcm",
        "ladd",
        "dmd2",
        "reflow",
    ]
    assert {r["steps"] for r in table["rows"]} == {1, 2, 4}
    assert rows[("dmd2", 1)]["ratio"] == pytest.approx(0.72 / 0.80)
    assert rows[("lcm", 4)]["ratio"] == pytest.approx(0.70 / 0.80)
    assert rows[("dmd2", 1)]["training_seconds"] == 350.0  # fit + teacher sampling
    assert rows[("dmd2", 2)]["fd_data"] is None and rows[("dmd2", 2)]["status"] == "done"
    assert rows[("reflow", 1)]["status"] == "not run" and rows[("reflow", 1)]["score"] is None
    assert rows[("dmd2", 4)]["faithful"] is False  # 0.95 / 0.80 = 1.19 > 1.10
    assert rows[("ladd", 4)]["teacher_diversity"] == TEACHER["div"]
    assert table["teacher"]["training_seconds"] == 900.0 and table["teacher"]["spread"] == 0.0


def test_a_step_count_only_one_method_validated_is_a_row_of_that_method_only(three_methods):
    """Every method has rows at 1, 2 and 4 steps (the issue's columns); a method that also
    validated 10 steps (guidance) adds its own row, and no other method gets a "not run" one."""
    lcm = three_methods["student"]["methods"]["lcm"]["validate"]
    lcm |= {f"val/student_10/{k}": v for k, v in student(0.79, 0.5, 10).items()}
    rows = rows_by(method_table(three_methods, ["lcm", "ladd", "dmd2", "reflow"]))
    assert rows[("lcm", 10)]["score"] == 0.79 and rows[("lcm", 10)]["status"] == "done"
    assert {n for m, n in rows if m != "lcm"} == {1, 2, 4}
    assert rows[("reflow", 4)]["status"] == "not run"


def test_best_method_per_step_skips_unfaithful_students(three_methods):
    best = best_per_steps(method_table(three_methods))
    # 1 step: dmd2 0.72 > ladd 0.70; 2: dmd2 0.78; 4: dmd2 0.95 is not faithful -> ladd 0.70
    # ties with lcm 0.70 at 4 steps, broken by the lower FD to the teacher (ladd 0.75 < 4.0)
    assert best == {1: "dmd2", 2: "dmd2", 4: "ladd"}


def test_bar_holds_when_a_method_beats_085_with_fd_no_worse_than_ladd(three_methods):
    bar = methods_bar(method_table(three_methods))
    # 1 step: ladd 0.70/0.80 = 0.875 (FD 3.0 = its own), dmd2 0.90 at FD 2.0; lcm 0.69, FD 4.0
    assert bar["holds"] is True and bar["methods"] == ["ladd", "dmd2"]
    three_methods["student"]["methods"]["ladd"]["validate"]["val/student_1/fd_teacher"] = 1.0
    three_methods["student"]["methods"]["ladd"]["validate"]["val/student_1/geneval/overall"] = 0.6
    bar = methods_bar(method_table(three_methods))
    assert bar["holds"] is False and "fails" in bar["text"]  # dmd2's FD 2.0 > LADD's 1.0


def test_bar_is_not_evaluated_without_ladd(three_methods):
    del three_methods["student"]["methods"]["ladd"]
    bar = methods_bar(method_table(three_methods))
    assert bar["holds"] is None and "not evaluated" in bar["text"] and "LADD" in bar["text"]


def row_cells(md: str, first: str, second: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:2] == [first, second]:
            return cells
    raise AssertionError(f"no row {first} {second}")


def test_markdown_table_notes_best_and_bar(three_methods):
    md = "\n".join(methods_markdown(method_table(three_methods, ["lcm", "ladd", "dmd2", "reflow"])))
    assert row_cells(md, "teacher (reference)", "–") == [
        "teacher (reference)", "–", "0.800 ± 0.020", "1.00×", "–", "3.00", "5.00", "40",
        "120.00", "900",
    ]  # fmt: skip
    assert row_cells(md, "dmd2", "1") == [
        "dmd2", "1", "0.720 ± 0.030", "0.90×", "2.00", "3.00", "4.00 / 5.00", "1", "3.00", "350",
    ]  # fmt: skip
    assert row_cells(md, "dmd2", "2")[5] == "–"
    assert row_cells(md, "dmd2", "4")[3] == "1.19× ⚠ not faithful"
    assert row_cells(md, "reflow", "4")[2:4] == ["not run", "–"]
    assert "largest difference 0.000" in md and "- dmd2: two nets" in md
    assert "1 step: **dmd2**, 2 steps: **dmd2**, 4 steps: **ladd**" in md
    assert "**Methods bar (" in md and "): holds** — met by ladd, dmd2" in md


def test_differing_teacher_references_are_flagged(three_methods):
    lcm = three_methods["student"]["methods"]["lcm"]["validate"]
    lcm["val/teacher/geneval/overall"] = 0.75  # other prompts or noise
    table = method_table(three_methods)
    assert table["teacher"]["spread"] == pytest.approx(0.05)
    assert "teacher references differ by 0.050" in "\n".join(methods_markdown(table))


def test_without_prompt_scores_only_distribution_measures_are_shown():
    validate = validation({1: {"fd_teacher": 2.0, "fd_data": 3.0, "nfe": 1.0}})
    validate = {k: v for k, v in validate.items() if "geneval" not in k}
    table = method_table(results(lcm={"validate": validate, "fit_seconds": 1.0}))
    md = "\n".join(methods_markdown(table))
    assert not table["has_scores"] and "prompt score ±" not in md and "Best method" not in md
    assert row_cells(md, "lcm", "1")[:4] == ["lcm", "1", "2.00", "3.00"]
    assert "distribution measures only" in md


def test_an_older_single_method_results_file_gives_a_one_method_table():
    single = {"student": {"method": "lcm", "validate": validation({1: student(0.4, 2.0, 1)})}}
    rows = rows_by(method_table(single))
    assert set(rows) == {("lcm", 1), ("lcm", 2), ("lcm", 4)}
    assert (
        rows[("lcm", 1)]["ratio"] == pytest.approx(0.5) and rows[("lcm", 2)]["status"] == "not run"
    )
    assert method_table({})["rows"] == []


def test_report_includes_the_section_and_writes_it_alone(tmp_path, three_methods):
    path = write_report(tmp_path, three_methods)
    md, alone = path.read_text(), (tmp_path / METHODS_TABLE).read_text()
    assert f"## {TITLE}" in md and alone.startswith(f"## {TITLE}")
    assert alone.strip() in md
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["methods"]["notes"] == {"dmd2": "two nets"}
    assert "ladd (of lcm, ladd, dmd2): " in md  # the stage row names every method run
