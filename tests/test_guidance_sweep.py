"""bench/guidance_sweep.py: one `fewstep validate` per scale, its CSV read back, one table."""

import csv
import subprocess
from pathlib import Path

import pytest
from bench_scripts import forget_bench, load_bench


@pytest.fixture
def sweep():
    yield load_bench("guidance_sweep")
    forget_bench("guidance_sweep")


def _fake_validate(overall_by_scale, calls):
    """subprocess.run stand-in: logs what `fewstep validate` would, for the scale it is given."""

    def run(command, check):
        calls.append(command)
        scale = float(next(a for a in command if "guidance_scale=" in a).split("=")[1])
        save_dir = next(a for a in command if "save_dir=" in a).split("=", 1)[1]
        folder = Path(save_dir) / "version_0"
        folder.mkdir(parents=True)
        row = {"val/geneval/overall": overall_by_scale[scale], "val/geneval/overall_se": 0.017}
        row |= {"val/geneval/position": 0.25, "epoch": 0}
        with (folder / "metrics.csv").open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        return subprocess.CompletedProcess(command, 0)

    return run


def test_each_scale_is_validated_once_and_tabled(sweep, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep.subprocess, "run", _fake_validate({1.0: 0.397, 1.5: 0.455}, calls))
    config = ["-c", "configs/teacher/flux_shapes.yaml"]
    results = {s: sweep.validate("x.ckpt", s, tmp_path, config) for s in (1.0, 1.5)}
    assert [c[1:4] for c in calls] == [["validate", *config]] * 2
    assert all("--ckpt_path" in c and "x.ckpt" in c for c in calls)
    table = sweep.table(results, 512).splitlines()
    assert table[0].startswith("| CFG | overall (n = 512) | single_object |")
    assert table[2].startswith("| 1 | 39.7 % ± 1.7 |") and table[3].startswith("| 1.5 | 45.5 % ±")
    assert "| 25 |" in table[3]  # position, in %; categories not logged read nan
    assert "nan" in table[3]


def test_a_validation_without_a_shapes_score_is_one_clear_error(sweep, tmp_path, monkeypatch):
    def run(command, check):
        return subprocess.CompletedProcess(command, 0)  # logs nothing

    monkeypatch.setattr(sweep.subprocess, "run", run)
    with pytest.raises(SystemExit, match="logged no val/geneval/overall"):
        sweep.validate("x.ckpt", 2.0, tmp_path, [])
