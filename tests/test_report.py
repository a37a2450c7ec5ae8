"""The demo report: tables with the right numbers, the issue-bar verdict, plot and grid PNGs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from fewstep.data.prompts import CATEGORIES
from fewstep.report import write_report

TEACHER_CATS = dict(zip(CATEGORIES, (0.95, 0.85, 0.75, 0.9, 0.6, 0.75), strict=True))  # mean 0.8


def student_metrics(overall_4: float, teacher_nfe: float = 40.0) -> dict[str, float]:
    """StudentModule-style validation metrics: teacher reference and students 1/2/4."""
    m = {f"val/teacher/geneval/{c}": v for c, v in TEACHER_CATS.items()}
    m |= {"val/teacher/geneval/overall": 0.8, "val/teacher/nfe": teacher_nfe}
    m["val/teacher/ms_per_image"] = 120.0
    for n, overall in ((1, 0.5), (2, 0.7), (4, overall_4)):
        p = f"val/student_{n}/"
        m |= {f"{p}geneval/{c}": overall for c in CATEGORIES}
        m |= {f"{p}geneval/overall": overall, f"{p}nfe": float(n), f"{p}ms_per_image": 3.0 * n}
        m |= {f"{p}speedup": 120.0 / (3.0 * n), f"{p}latent_mse": 0.01 / n, f"{p}psnr": 20.0 + n}
    return m


def full_results(overall_4: float, teacher_nfe: float = 40.0) -> dict:
    """A results.json as fewstep.demo writes it after every stage."""
    vae = {c: 0.98 for c in CATEGORIES} | {"overall": 0.98}
    teacher = {f"val/geneval/{c}": v for c, v in TEACHER_CATS.items()}
    return {
        "shapes": {"clean": {"overall": 1.0}, "seconds": 7.7},
        "vae": {"reconstruction_geneval": vae, "seconds": 747.6},
        "cache": {"samples": 20000, "shards": 20, "seconds": 7.7},
        "teacher": {
            "validate": teacher | {"val/geneval/overall": 0.81, "val/nfe": 20.0},
            "seconds": 1000.0,
        },
        "student": {
            "method": "lcm",
            "validate": student_metrics(overall_4, teacher_nfe),
            "seconds": 500.0,
        },
        "report": {"report": "runs/demo/report.md", "seconds": 0.4},  # an earlier report
    }


@pytest.fixture(scope="module")
def student_log(tmp_path_factory):
    """A student log dir with grid PNGs as validation writes them (n=1 at two steps, n=4 once)."""
    from fewstep.utils.artifacts import GRID_FOLDER, student_grid_name

    log_dir = tmp_path_factory.mktemp("student") / "version_0"
    (log_dir / GRID_FOLDER).mkdir(parents=True)
    for n, step, color in ((1, 10, (255, 0, 0)), (1, 20, (0, 255, 0)), (4, 20, (0, 0, 255))):
        image = np.zeros((24, 48, 3), dtype=np.uint8) + np.array(color, dtype=np.uint8)
        Image.fromarray(image).save(log_dir / GRID_FOLDER / student_grid_name(step, n))
    return log_dir.parent


@pytest.fixture
def teacher_log(tmp_path):
    """A teacher log dir with CFG grid PNGs from two evaluations."""
    folder = tmp_path / "teacher" / "cfg_eval"
    folder.mkdir(parents=True)
    for name in (
        "step0000100_scale3_steps20",
        "step0000200_scale1_steps4",
        "step0000200_scale3_steps20",
    ):
        Image.new("RGB", (8, 8), "white").save(folder / f"{name}.png")
    return folder.parent


def row(md: str, first_cell: str) -> list[str]:
    """The cells of the markdown table row that starts with ``first_cell``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in report")


def valid_png(path) -> tuple[int, int]:
    """Size of a readable PNG (fails on anything else)."""
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_passing_report_tables_numbers_and_images(tmp_path, student_log, teacher_log):
    run_dir = tmp_path / "demo"
    path = write_report(run_dir, full_results(overall_4=0.76), student_log, teacher_log)
    md = path.read_text()
    assert path == run_dir / "report.md"
    assert row(md, "vae")[1:3] == ["done", "747.6"]
    assert "0.980" in row(md, "vae")[3] and "20000 samples in 20 shards" in row(md, "cache")[3]
    assert row(md, "**total**")[2] == "2263.0"  # the report's own stage is not counted
    assert row(md, "student")[3] == "lcm: 4-step GenEval overall 0.760 (95.0 % of teacher) at NFE 4"
    assert row(md, "color_attr") == ["color_attr", "0.980"]  # VAE table comes first
    assert "VAE bar (overall ≥ 0.95): **holds** (0.9800)." in md
    teacher_table = md.split("## Teacher GenEval")[1].split("##")[0]
    assert row(teacher_table, "position") == ["position", "0.600"]
    assert row(teacher_table, "**overall**") == ["**overall**", "0.810"]
    assert row(md, "teacher (reference)") == [
        "teacher (reference)", "0.950", "0.850", "0.750", "0.900", "0.600", "0.750",
        "0.800", "100.0 %", "40", "1.0×", "120.00", "1.0×", "–", "–", "–", "–", "–", "–", "–",
    ]  # fmt: skip
    assert row(md, "student 4 steps") == [
        "student 4 steps", *["0.760"] * 6,
        "0.760", "95.0 %", "4", "10.0×", "12.00", "10.0×", "0.0025", "24.00",
        "–", "–", "–", "–", "–",
    ]  # fmt: skip
    assert row(md, "student 1 step")[7:10] == ["0.500", "62.5 %", "1"]
    assert "**Issue bar (" in md and "): holds** — 4-step overall 0.760 = 95.0 %" in md
    assert "NFE 40 → 4 = 10.0× fewer (≥ 10×)" in md
    assert valid_png(run_dir / "report_score_vs_nfe.png") == (760, 480)
    assert "![GenEval-protocol overall vs NFE](report_score_vs_nfe.png)" in md
    for n, color in ((1, (0, 255, 0)), (4, (0, 0, 255))):  # n=1: the latest step's grid
        assert valid_png(run_dir / f"report_grid_{n}steps.png") == (48, 24)
        assert Image.open(run_dir / f"report_grid_{n}steps.png").getpixel((5, 5)) == color
        assert f"](report_grid_{n}steps.png)" in md
    assert "### 2-step student\n\nGrid: not run." in md
    assert "](../teacher/cfg_eval/step0000200_scale1_steps4.png)" in md  # relative links
    assert "](../teacher/cfg_eval/step0000200_scale3_steps20.png)" in md
    assert "step0000100" not in md  # only the latest evaluation's grids


def test_report_json_has_the_same_numbers(tmp_path, student_log):
    run_dir = tmp_path / "demo"
    write_report(run_dir, full_results(overall_4=0.76), student_log, None)
    report = json.loads((run_dir / "report.json").read_text())
    s4 = report["comparison"]["rows"]["student_4"]
    assert s4["geneval"]["overall"] == 0.76 and s4["nfe"] == 4.0
    assert s4["percent_of_teacher"] == pytest.approx(95.0) and s4["nfe_reduction"] == 10.0
    assert report["bar"]["holds"] is True
    assert report["vae"]["reconstruction_geneval"]["overall"] == 0.98
    assert report["teacher"] == {"geneval": {**TEACHER_CATS, "overall": 0.81}, "nfe": 20.0}
    assert report["images"]["grids"] == {
        "1": "report_grid_1steps.png",
        "4": "report_grid_4steps.png",
    }
    assert [r["stage"] for r in report["stages"]] == [
        "shapes",
        "vae",
        "cache",
        "teacher",
        "student",
    ]


@pytest.mark.parametrize(
    ("overall_4", "teacher_nfe", "why"),
    [(0.70, 40.0, "87.5 % of the teacher's 0.800 (< 90 %)"), (0.76, 20.0, "5.0× fewer (< 10×)")],
)
def test_failing_bar(tmp_path, overall_4, teacher_nfe, why):
    md = write_report(tmp_path, full_results(overall_4, teacher_nfe), None, None).read_text()
    assert "): fails** — 4-step overall" in md and why in md and "): holds**" not in md
    assert json.loads((tmp_path / "report.json").read_text())["bar"]["holds"] is False


def test_missing_stages_are_not_run(tmp_path):
    results = {"shapes": {"clean": {"overall": 1.0}, "seconds": 7.7}}
    md = write_report(
        tmp_path, results, tmp_path / "no_such_log", tmp_path / "nor_this"
    ).read_text()
    for stage in ("vae", "cache", "teacher", "student"):
        assert row(md, stage)[1] == "not run"
    for name in ("teacher (reference)", "student 1 step", "student 2 steps", "student 4 steps"):
        assert row(md, name)[1] == "not run"
    assert row(md, "not run") == ["not run", "–"]  # VAE and teacher tables
    assert "): not evaluated** — teacher reference, 4-step student not run" in md
    assert "Plot: not run." in md and not (tmp_path / "report_score_vs_nfe.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["bar"]["holds"] is None and report["comparison"]["rows"]["student_4"] is None


def test_teacher_only_falls_back_to_teacher_stage(tmp_path):
    results = full_results(0.76)
    del results["student"]
    md = write_report(tmp_path, results, None, None).read_text()
    assert row(md, "teacher (reference)")[7:10] == ["0.810", "100.0 %", "20"]
    assert "Teacher reference from: teacher stage validation" in md
    assert row(md, "student 4 steps")[1] == "not run" and "4-step student not run" in md
    assert valid_png(tmp_path / "report_score_vs_nfe.png")


def test_unreadable_grid_and_stale_images_do_not_break_it(tmp_path):
    log_dir = tmp_path / "student" / "teacher_vs_student"
    log_dir.mkdir(parents=True)
    (log_dir / "step0000020_4steps.png").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "report_grid_4steps.png").write_bytes(b"stale")
    with pytest.warns(UserWarning, match="not an image"):
        md = write_report(tmp_path, full_results(0.76), log_dir.parent, None).read_text()
    assert "### 4-step student\n\nGrid: not run." in md
    assert not (tmp_path / "report_grid_4steps.png").exists()  # a stale grid is not kept


def test_malformed_entries_do_not_crash(tmp_path):
    results = {
        "vae": {"reconstruction_geneval": None},
        "teacher": {"validate": ["x"], "seconds": "n/a"},
        "student": "oops",
        "extra": {"seconds": 1.5},
    }
    md = write_report(tmp_path, results, None, None).read_text()
    assert row(md, "student")[1] == "not run" and row(md, "teacher")[1:3] == ["done", "–"]
    assert row(md, "extra")[1:3] == ["done", "1.5"]
    assert "): not evaluated**" in md


def test_reused_fit_time_counts_in_the_stage_row(tmp_path):
    results = {"teacher": {"validate": {}, "seconds": 33.0, "reused_fit_seconds": 2050.0}}
    md = write_report(tmp_path, results, None, tmp_path / "no_teacher").read_text()
    assert row(md, "teacher")[1:3] == ["done (earlier fit reused)", "2083.0"]


def test_report_flags_students_above_110_percent_and_shows_spread():
    from fewstep.report.markdown import _compare_cells, unfaithful_lines

    rows = {
        "teacher": {"geneval": {"overall": 0.5, "overall_se": 0.02}},
        "student_1": {"geneval": {"overall": 0.52}, "percent_of_teacher": 104.0},
        "student_4": {
            "geneval": {"overall": 0.6, "overall_se": 0.021},
            "percent_of_teacher": 120.0,
            "fd_teacher": 3.5,
            "fd_data": 2.25,
            "kid_teacher": 0.0125,
            "kid_data": 0.003,
            "diversity": 1.5,
        },
    }
    lines = "\n".join(unfaithful_lines(rows))
    assert "student 4 steps: not faithful to the teacher** — 120 %" in lines
    assert "student 1 step" not in lines
    cells = _compare_cells("student 4 steps", rows["student_4"])
    assert "0.600 ± 0.021" in cells and cells[-5:] == ["3.50", "2.25", "0.0125", "0.0030", "1.50"]


def test_a_vae_just_under_the_bar_fails_with_the_digits_that_show_why(tmp_path):
    results = full_results(overall_4=0.76)
    results["vae"]["reconstruction_geneval"]["overall"] = 0.94974
    md = write_report(tmp_path / "demo", results, None, None).read_text()
    assert "VAE bar (overall ≥ 0.95): **fails** (0.9497)." in md
