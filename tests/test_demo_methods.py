"""`FEWSTEP_DEMO_STUDENT=all` (or a comma list): every method distilled in turn from one teacher,
each reused once finished, all validated on the same prompts, noise and teacher reference."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from student_fixtures import resolved_config

from fewstep import demo
from fewstep.utils.manifest import write_manifest

CACHE_STUDENTS = [m for m in demo.STUDENTS if m != "reflow"]  # reflow's own data are couplings


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    profile = dataclasses.replace(demo.PROFILES["cpu"], run_dir=tmp_path / "demo")
    monkeypatch.setitem(demo.PROFILES, "cpu", profile)
    for name in ("PROFILE", "STAGES", "TEACHER", "DATA"):
        monkeypatch.delenv(f"FEWSTEP_DEMO_{name}", raising=False)
    return tmp_path / "demo"


@pytest.mark.parametrize(
    ("raw", "methods", "primary"),
    [
        ("all", list(demo.STUDENTS), "ladd"),
        ("lcm, dmd2", ["lcm", "dmd2"], "lcm"),
        ("dmd2,ladd,dmd2", ["dmd2", "ladd"], "ladd"),
        ("scm", ["scm"], "scm"),
    ],
)
def test_methods_are_named_one_by_list_or_all(monkeypatch, raw, methods, primary):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", raw)
    assert demo.student_methods() == methods and demo.student_method() == primary


@pytest.mark.parametrize("raw", ["lcm,dmd3", ",", "everything"])
def test_an_unknown_method_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", raw)
    with pytest.raises(SystemExit, match="FEWSTEP_DEMO_STUDENT=.*choose one of.*'all'"):
        demo.student_methods()


class FakeCli:
    """Stands in for ``fewstep``: records calls; ``validate`` returns per-method metrics and
    fails once for ``fail_once`` (an interrupted run)."""

    def __init__(self, fail_once: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_once = fail_once

    def __call__(self, args: list[str]) -> SimpleNamespace:
        config = next(a for a in args if a.endswith(".yaml"))
        method = next(
            m for m, (name, _) in demo.STUDENTS.items() if config.endswith(f"{name}.yaml")
        )
        self.calls.append((args[0], method))
        if args[0] == "validate" and method == self.fail_once:
            self.fail_once = None
            raise RuntimeError("interrupted")
        metrics = {"val/teacher/geneval/overall": 0.5, "val/student_1/geneval/overall": 0.4}
        return SimpleNamespace(trainer=SimpleNamespace(callback_metrics=metrics, callbacks=[]))


def test_each_method_runs_in_turn_and_an_interrupted_run_resumes(run_dir, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm,ladd,dmd2")
    cli = FakeCli(fail_once="dmd2")
    monkeypatch.setattr(demo, "_cli", cli)
    with pytest.raises(RuntimeError, match="interrupted"):
        demo.stage_student()
    assert cli.calls == [(s, m) for m in ("lcm", "ladd", "dmd2") for s in ("fit", "validate")]
    cli.calls.clear()
    stage = demo.stage_student()  # lcm and ladd: fit and figures reused; dmd2: validated now
    assert cli.calls == [("validate", "dmd2")]
    assert stage["methods_order"] == ["lcm", "ladd", "dmd2"] and stage["method"] == "ladd"
    assert stage["validate"] == stage["methods"]["ladd"]["validate"]
    assert all(e["fit_seconds"] >= 0 for e in stage["methods"].values())
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "student")  # named: every method validates again
    cli.calls.clear()
    demo.stage_student()
    assert cli.calls == [("validate", m) for m in ("lcm", "ladd", "dmd2")]


def test_the_student_stage_is_reused_only_when_every_method_finished(run_dir, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm,ladd")
    for method in ("lcm", "ladd"):
        (run_dir / f"student_{method}").mkdir(parents=True)
        (run_dir / f"student_{method}" / "FINISHED").write_text("{}")
    results = {"student": {"method": "ladd", "methods": {"lcm": {}, "ladd": {}}}}
    assert demo.reusable("student", results)
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm,ladd,dmd2")  # one more method asked for
    assert not demo.reusable("student", results)


def test_figures_of_another_teacher_are_not_reused(run_dir, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm")
    cli = FakeCli()
    monkeypatch.setattr(demo, "_cli", cli)
    demo.stage_student()
    ckpt = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"a retrained teacher")
    cli.calls.clear()
    demo.stage_student()
    assert cli.calls == [("validate", "lcm")]  # the student's check against its teacher runs


def _merged(profile: demo.Profile, name: str) -> dict:
    return demo._merged_config(profile.configs(name))


@pytest.mark.parametrize("profile_name", sorted(demo.PROFILES))
def test_every_method_validates_on_the_same_prompts_noise_and_teacher(profile_name):
    """What makes the methods table a comparison: one teacher (config, weights, reference
    sampler and CFG scale), one held-out split read in the same batches, one noise seed."""
    profile = demo.PROFILES[profile_name]

    def setting(method: str) -> dict:
        config = _merged(profile, demo.STUDENTS[method][0])
        model, data = config["model"]["init_args"], config["data"]["init_args"]
        teacher = {k: model.get(k) for k in ("teacher_config", "teacher_ckpt")}
        teacher["use_ema"] = model.get("use_teacher_ema", True)  # StudentModule default
        guidance = model.get("guidance_scale")
        return {
            "data": {k: data.get(k) for k in ("path", "val_fraction", "batch_size", "val_path")},
            "data_seed": data.get("seed", 0),
            "noise_seed": model.get("seed", 0),
            "prompts": (model["val_num_samples"], config["trainer"]["limit_val_batches"]),
            "teacher": teacher,
            "reference": (model["teacher_sampler"], 3.0 if guidance is None else guidance),
        }

    reference = setting("ladd")
    for method in CACHE_STUDENTS:
        assert setting(method) == reference, method
    reflow = setting("reflow")  # the same teacher and reference; its data validate on the cache
    assert (reflow["teacher"], reflow["reference"]) == (
        reference["teacher"],
        reference["reference"],
    )
    teacher_cfg = _merged(profile, "teacher/shapes")["model"]["init_args"]["guidance_scale"]
    assert teacher_cfg == 3.0  # reflow's guidance_scale null means the teacher's


def test_reflow_validates_on_the_cache_split_and_counts_its_seen_pairs(
    run_dir, monkeypatch, capsys
):
    monkeypatch.setattr("fewstep.data.cache.read_manifest", lambda path: {"num_samples": 8000})
    args, note = demo._reflow_on_cache(run_dir / "student_reflow")
    overlay = yaml.safe_load((run_dir / "student_reflow" / "validate_on_cache.yaml").read_text())
    ladd = _merged(demo.PROFILES["cpu"], "student/ladd_shapes")
    assert args == ["-c", str(run_dir / "student_reflow" / "validate_on_cache.yaml")]
    assert overlay == {"data": ladd["data"]}
    # explicit count: cache held-out = first 256 of a seeded permutation of 8000; coupling
    # training = all but the first 256 of a seeded permutation of the 1280 couplings
    held_out = set(np.random.default_rng(0).permutation(8000)[:256].tolist())
    trained = set(np.random.default_rng(0).permutation(1280)[256:].tolist())
    seen = len(held_out & trained)
    assert 0 < seen < 256 and f"{seen} of those 256 (prompt, noise) pairs" in note
    # the CLI layers the overlay over reflow's CouplingDataModule: the cache's datamodule results
    reflow = demo.PROFILES["cpu"].configs(demo.STUDENTS["reflow"][0])
    resolved = resolved_config(
        capsys, *reflow, run_dir / "student_reflow" / "validate_on_cache.yaml"
    )
    assert resolved["data"]["class_path"] == ladd["data"]["class_path"]
    wanted = ladd["data"]["init_args"]
    assert {k: resolved["data"]["init_args"][k] for k in wanted} == wanted


def test_reflow_with_a_shipped_teacher_draws_its_couplings_from_the_teacher_yaml(
    run_dir, monkeypatch, tmp_path
):
    """The couplings come from the shipped teacher (teacher.yaml, no checkpoint), the student
    loads the same teacher, and reflow is validated like every method."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "teacher.yaml").write_text("model: {}\n")  # as fewstep ship writes (a DiT's)
    write_manifest(folder, {"recipe": {"weights": "ema"}})
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", str(folder))
    calls: list[list[str]] = []

    def cli(args: list[str]) -> SimpleNamespace:
        calls.append(args)
        metrics = {"val/teacher/geneval/overall": 0.5, "val/student_1/geneval/overall": 0.4}
        return SimpleNamespace(trainer=SimpleNamespace(callback_metrics=metrics, callbacks=[]))

    monkeypatch.setattr(demo, "_cli", cli)
    monkeypatch.setattr(demo, "_reflow_on_cache", lambda log_dir: ([], "validated on the cache"))
    entry = demo.distil("reflow")
    assert [c[0] for c in calls] == ["couplings", "fit", "validate"]
    teacher_yaml = str(folder / "teacher.yaml")
    assert calls[0][-4:] == ["--teacher_config", teacher_yaml, "--teacher_ckpt", "null"]
    assert f"--model.init_args.teacher_config={teacher_yaml}" in calls[1]
    assert not any("pooled_text" in arg for arg in calls[1])  # a DiT teacher takes none
    assert entry["validate"]["val/student_1/geneval/overall"] == 0.4
    assert entry["teacher"].startswith(f"shipped:{folder.resolve()}")


def test_results_record_every_method_for_the_report(run_dir, monkeypatch):
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm,ladd")
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "student,report")
    monkeypatch.setattr(demo, "_cli", FakeCli())
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["student"]["methods"]) == ["lcm", "ladd"]
    table = (run_dir / "methods_table.md").read_text()
    assert "| lcm | 1 | 0.400 | 0.80× |" in table and "| ladd | 2 | not run |" in table
