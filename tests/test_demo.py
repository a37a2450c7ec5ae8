"""`make demo` orchestration: stage selection, figures file, reuse of finished stages."""

from __future__ import annotations

import json

import pytest

from fewstep import demo


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "RUN_DIR", tmp_path / "demo")
    monkeypatch.setattr(demo, "RESULTS", tmp_path / "demo" / "results.json")
    return tmp_path / "demo"


def test_selected_stage_runs_and_records_its_figures(run_dir, monkeypatch, capsys):
    calls = []
    monkeypatch.setitem(demo.STAGES, "shapes", lambda: calls.append(1) or {"score": 1.0})
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "shapes")
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["shapes"]["score"] == 1.0 and "seconds" in results["shapes"]
    assert calls == [1] and "[1/1] shapes" in capsys.readouterr().out


def test_figures_of_earlier_stages_are_kept(run_dir, monkeypatch):
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"vae": {"fidelity": 0.96}}))
    monkeypatch.setitem(demo.STAGES, "shapes", lambda: {"score": 1.0})
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "shapes")
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["vae"] == {"fidelity": 0.96} and results["shapes"]["score"] == 1.0


def test_unknown_stage_is_one_clear_error(run_dir, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "shapes,teachr")
    with pytest.raises(SystemExit, match="unknown stage.*teachr"):
        demo.main()


def test_resume_argument_only_when_last_checkpoint_exists(tmp_path):
    assert demo._last_checkpoint(tmp_path) == []
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert demo._last_checkpoint(tmp_path) == ["--ckpt_path", str(last)]


def test_fit_runs_once_records_its_time_and_is_reused(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(demo, "_cli", lambda args: calls.append(args))
    assert demo._fit_once(tmp_path / "c.yaml", tmp_path) == {}
    assert calls and calls[0][:3] == ["fit", "-c", str(tmp_path / "c.yaml")]
    assert "--trainer.limit_val_batches" in calls[0]  # validated once, after the fit
    recorded = json.loads((tmp_path / "FINISHED").read_text())["fit_seconds"]
    assert demo._fit_once(tmp_path / "c.yaml", tmp_path) == {"reused_fit_seconds": recorded}
    assert len(calls) == 1
    (tmp_path / "FINISHED").write_text("fit finished\n")  # written by an older fewstep
    assert demo._fit_once(tmp_path / "c.yaml", tmp_path) == {"reused_fit_seconds": 0.0}
