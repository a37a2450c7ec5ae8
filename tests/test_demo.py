"""`make demo` orchestration: stage selection, figures file, reuse of finished stages."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from student_fixtures import deep_merge

from fewstep import demo


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    profile = dataclasses.replace(demo.PROFILES["cpu"], run_dir=tmp_path / "demo")
    monkeypatch.setitem(demo.PROFILES, "cpu", profile)
    for name in ("PROFILE", "STAGES", "STUDENT", "TEACHER", "DATA"):
        monkeypatch.delenv(f"FEWSTEP_DEMO_{name}", raising=False)
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


def test_an_interrupted_fit_is_not_marked_finished_and_ends_the_demo(tmp_path, monkeypatch):
    """A SIGTERM'd fit returns normally from LightningCLI (with its exact last.ckpt); the demo
    must stop with 143 and resume it next time, not validate a half-trained model."""
    import signal
    from types import SimpleNamespace

    from fewstep.lightning.interrupt import GracefulStop

    stopped = GracefulStop()
    stopped.received = signal.SIGTERM
    monkeypatch.setattr(
        demo, "_cli", lambda args: SimpleNamespace(trainer=SimpleNamespace(callbacks=[stopped]))
    )
    with pytest.raises(SystemExit) as exit_info:
        demo._fit_once(tmp_path / "c.yaml", tmp_path)
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "FINISHED").exists()


def test_unknown_profile_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_PROFILE", "tpu")
    with pytest.raises(SystemExit, match="FEWSTEP_DEMO_PROFILE='tpu'.*cpu.*gpu"):
        demo.main()


def test_gpu_profile_runs_the_gpu_configs_into_its_own_folder(monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_PROFILE", "gpu")
    profile = demo.active_profile()
    assert profile.run_dir == Path("runs/shapes128") and profile.resolution == 128
    assert profile.config("teacher/shapes") == demo.CONFIGS / "teacher/shapes_gpu.yaml"


def _init_args(config: dict, section: str) -> dict:
    return config[section].get("init_args", config[section])


def _merged(paths: list[Path]) -> dict:
    """A config chain as one dict (mappings merge key by key, as ``-c a -c b`` does)."""
    merged: dict = {}
    for path in paths:
        merged = deep_merge(merged, yaml.safe_load(path.read_text()) or {})
    return merged


def _profile_configs(profile: demo.Profile) -> dict[str, dict]:
    names = ["vae/shapes", "cache/shapes", "teacher/shapes", demo.COUPLINGS]
    names += [name for name, _ in demo.STUDENTS.values()]
    return {name: _merged(profile.configs(name)) for name in names}


@pytest.mark.parametrize("name", sorted(demo.PROFILES))
def test_each_profile_chains_its_stages_through_its_run_folder(name):
    """Each stage reads what the one before wrote, all under the profile's run folder."""
    profile = demo.PROFILES[name]
    run = str(profile.run_dir)
    configs = _profile_configs(profile)
    vae, cache, teacher = configs["vae/shapes"], configs["cache/shapes"], configs["teacher/shapes"]
    assert _init_args(vae, "model")["export_dir"] == f"{run}/vae"
    assert vae["data"]["init_args"]["train"]["init_args"]["resolution"] == profile.resolution
    assert cache["dataset"]["init_args"]["resolution"] == profile.resolution
    assert cache["vae"]["init_args"]["pretrained_path"] == f"{run}/vae"
    assert cache["out"] == f"{run}/cache"
    teacher_args = _init_args(teacher, "model")
    assert teacher_args["vae_path"] == f"{run}/vae"
    assert _init_args(teacher, "data")["path"] == f"{run}/cache"
    assert teacher["trainer"]["logger"]["init_args"]["save_dir"] == run
    assert teacher["trainer"]["logger"]["init_args"]["name"] == "teacher"
    teacher_ckpt = f"{run}/teacher/checkpoints/last.ckpt"
    couplings = configs[demo.COUPLINGS]
    assert couplings["teacher_config"] == str(
        profile.config("teacher/shapes").relative_to(demo.CONFIGS.parent)
    )
    assert couplings["teacher_ckpt"] == teacher_ckpt and couplings["cache"] == f"{run}/cache"
    for method, (config_name, log_name) in demo.STUDENTS.items():
        student = configs[config_name]
        args = _init_args(student, "model")
        assert args["teacher_config"] == couplings["teacher_config"], method
        assert args["teacher_ckpt"] == teacher_ckpt and args["vae_path"] == f"{run}/vae", method
        data = f"{run}/couplings" if method == "reflow" else f"{run}/cache"
        assert _init_args(student, "data")["path"] == data, method
        logger = student["trainer"]["logger"]["init_args"]
        assert (logger["save_dir"], logger["name"]) == (run, log_name), method
    assert couplings["out"] == f"{run}/couplings"


def test_cpu_demo_validations_score_256_held_out_prompts():
    """The teacher and every student are scored on 256 prompts: the val split of their data
    (the cache, or the reflow couplings) fills limit_val_batches batches exactly."""
    profile = demo.PROFILES["cpu"]
    configs = _profile_configs(profile)
    samples = {
        f"{profile.run_dir}/cache": configs["cache/shapes"]["dataset"]["init_args"]["size"],
        f"{profile.run_dir}/couplings": configs[demo.COUPLINGS]["num_samples"],
    }
    for name in ["teacher/shapes", *(n for n, _ in demo.STUDENTS.values())]:
        data = _init_args(configs[name], "data")
        held_out = round(samples[data["path"]] * data["val_fraction"])
        assert held_out == 256, name
        assert configs[name]["trainer"]["limit_val_batches"] * data["batch_size"] == 256, name
        assert _init_args(configs[name], "model")["val_num_samples"] == 256, name


FINISHED_UP_TO_TEACHER = ["shapes/scores.json", "vae/config.json", "cache/manifest.json"]


def _finished_teacher(run_dir: Path) -> None:
    """Outputs and recorded figures of shapes, vae, cache and teacher."""
    for output in [*FINISHED_UP_TO_TEACHER, "teacher/FINISHED"]:
        (run_dir / output).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / output).write_text("{}")
    stages = ["shapes", "vae", "cache", "teacher"]
    (run_dir / "results.json").write_text(json.dumps({s: {"score": 0.1} for s in stages}))


def test_a_full_rerun_reuses_finished_stages(run_dir, monkeypatch, capsys):
    _finished_teacher(run_dir)
    calls = []
    for name in demo.STAGES:
        monkeypatch.setitem(demo.STAGES, name, lambda name=name: calls.append(name) or {})
    demo.main()
    assert calls == ["student", "report"]
    assert "teacher: finished before, figures reused" in capsys.readouterr().out
    assert json.loads((run_dir / "results.json").read_text())["teacher"] == {"score": 0.1}


def test_named_or_vanished_stages_run_again(run_dir, monkeypatch):
    _finished_teacher(run_dir)
    calls = []
    monkeypatch.setitem(demo.STAGES, "teacher", lambda: calls.append(1) or {"score": 0.2})
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "teacher")
    demo.main()  # named: runs again
    assert calls == [1]
    monkeypatch.delenv("FEWSTEP_DEMO_STAGES")
    assert demo.reusable("teacher", {"teacher": {}})
    (run_dir / "teacher" / "FINISHED").unlink()  # its output is gone: not reusable
    assert not demo.reusable("teacher", {"teacher": {}})
    assert not demo.reusable("report", {"report": {}})  # the report is always rewritten


def test_a_student_of_another_method_is_not_reused(run_dir, monkeypatch):
    (run_dir / "student_ladd").mkdir(parents=True)
    (run_dir / "student_ladd" / "FINISHED").write_text("{}")
    results = {"student": {"method": "ladd"}}
    assert demo.reusable("student", results)
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm")
    assert not demo.reusable("student", results)


def test_stages_after_one_that_runs_run_too(run_dir, monkeypatch):
    """A rerun teacher invalidates the student distilled from the old one."""
    (run_dir / "student_ladd").mkdir(parents=True)
    (run_dir / "student_ladd" / "FINISHED").write_text("{}")
    _finished_teacher(run_dir)
    (run_dir / "teacher" / "FINISHED").unlink()  # the teacher is trained again
    results = json.loads((run_dir / "results.json").read_text())
    results["student"] = {"method": "ladd"}
    run_dir.joinpath("results.json").write_text(json.dumps(results))
    calls = []
    for name in demo.STAGES:
        monkeypatch.setitem(demo.STAGES, name, lambda name=name: calls.append(name) or {})
    demo.main()
    assert calls == ["teacher", "student", "report"]


def test_gpu_overlays_run_on_their_cpu_base_and_full_configs_alone():
    gpu, cpu = demo.PROFILES["gpu"], demo.PROFILES["cpu"]
    base, overlay = gpu.configs("student/dmd2_shapes")
    assert (base.name, overlay.name) == ("dmd2_shapes.yaml", "dmd2_shapes_gpu.yaml")
    assert gpu.configs("student/ladd_shapes") == [demo.CONFIGS / "student/ladd_shapes_gpu.yaml"]
    assert cpu.configs("student/dmd2_shapes") == [demo.CONFIGS / "student/dmd2_shapes.yaml"]
    assert demo._config_args([base, overlay]) == ["-c", str(base), "-c", str(overlay)]
