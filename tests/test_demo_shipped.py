"""`FEWSTEP_DEMO_TEACHER=<shipped folder>`: the demo encodes the cache with the shipped VAE,
validates the shipped teacher, distils it with two methods and compares them in the report; a
changed shipped file is one clear error before anything runs. End to end on a tiny teacher."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from student_fixtures import (
    CONFIGS,
    PROCESSES,
    build_tiny_cache,
    build_tiny_teacher,
    build_tiny_vae,
    teacher_yaml,
    train_flux_teacher,
)

from fewstep import demo
from fewstep.cli import run
from fewstep.data.cache import LatentCache, read_manifest
from fewstep.lightning.checkpoints import load_teacher
from fewstep.report.methods_md import METHODS_TABLE, NO_SCORES, TITLE
from fewstep.utils.fingerprint import weights_hash

METHODS = ("lcm", "ladd")
MISSING = "no/such/path"  # what the tiny configs name for the teacher and VAE: overridden


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """A tiny trained teacher shipped with `fewstep ship` (EMA weights, manifest with a score)."""
    root = tmp_path_factory.mktemp("shipped_demo")
    tiny = build_tiny_teacher(root / "trained", "flow")
    out = root / "reference"
    info = json.dumps({"score": {"overall": 0.5}, "train_seconds": 12.0})
    args = ["--config", str(tiny.config), "--ckpt_path", str(tiny.ckpt), "--out", str(out)]
    run(["ship", *args, "--info", info])
    return tiny, out


def _logger(run_dir: Path, name: str) -> dict:
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(run_dir), "name": name, "version": ""},
    }


def _trainer(run_dir: Path, name: str, **extra) -> dict:
    """A one-CPU trainer validating one batch, logging under ``run_dir/name``."""
    return {
        "accelerator": "cpu",
        "devices": 1,
        "precision": "32-true",
        "limit_val_batches": 1,
        "num_sanity_val_steps": 0,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": _logger(run_dir, name),
        **extra,
    }


def _student_yaml(method: str, run_dir: Path) -> dict:
    """The demo's student YAML shrunk to 2 optimiser steps on the tiny cache under ``run_dir``,
    its teacher and VAE pointing nowhere (the shipped teacher's overrides must replace them)."""
    config = yaml.safe_load((CONFIGS / f"student/{method}_shapes.yaml").read_text())
    args = config["model"]["init_args"]
    args.update(teacher_config=MISSING, teacher_ckpt=MISSING, vae_path=MISSING)
    args.update(val_num_samples=4, eval_steps=[1, 2], teacher_sampler=PROCESSES["flow"]["sampler"])
    args.update(diversity_prompts=2, diversity_seeds=2, grid_samples=2)
    config["data"]["init_args"].update(
        path=str(run_dir / "cache"), batch_size=4, val_fraction=0.25, num_workers=0
    )
    checkpoint = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "every_n_train_steps": 1},
    }
    config["trainer"] = _trainer(
        run_dir, f"student_{method}", max_steps=2, val_check_interval=1, log_every_n_steps=1
    )
    config["trainer"]["callbacks"] = [checkpoint]
    return config


def tiny_configs(folder: Path, run_dir: Path, tiny, methods: tuple[str, ...] = METHODS) -> Path:
    """configs/{cache,teacher,student} for the demo on the tiny world under ``run_dir``."""
    cache = yaml.safe_load((CONFIGS / "cache/shapes.yaml").read_text())
    cache["dataset"]["init_args"]["size"] = 24
    cache["vae"]["init_args"]["pretrained_path"] = MISSING
    cache.update(out=str(run_dir / "cache"), shard_size=24, batch_size=24, device="cpu")
    teacher = teacher_yaml(run_dir / "cache", Path(MISSING))
    teacher["data"]["init_args"]["text_dropout"] = 0.0
    teacher["trainer"] = _trainer(run_dir, "teacher")
    files = {"cache/shapes": cache, "teacher/shapes": teacher}
    files |= {f"student/{m}_shapes": _student_yaml(m, run_dir) for m in methods}
    for name, config in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return folder


@pytest.fixture
def demo_on(tmp_path, monkeypatch, shipped):
    """The cpu profile pointed at tiny configs and a run folder in tmp_path, and the shipped
    teacher named by FEWSTEP_DEMO_TEACHER; returns (run folder, shipped folder)."""
    tiny, out = shipped
    run_dir = tmp_path / "demo"
    configs = tiny_configs(tmp_path / "configs", run_dir, tiny)
    profile = dataclasses.replace(demo.PROFILES["cpu"], run_dir=run_dir, configs_dir=configs)
    monkeypatch.setitem(demo.PROFILES, "cpu", profile)
    monkeypatch.delenv("FEWSTEP_DEMO_PROFILE", raising=False)
    monkeypatch.delenv("FEWSTEP_DEMO_DATA", raising=False)
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", str(out))
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", ",".join(METHODS))
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "cache,teacher,student,report")
    return run_dir, out


def test_demo_distils_the_shipped_teacher_and_compares_methods(demo_on, shipped):
    run_dir, out = demo_on
    tiny, _ = shipped
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["source"].startswith(f"shipped:{out.resolve()} sha256:")
    # the cache was encoded by the shipped VAE (the configs name none that exists)
    cached_vae = read_manifest(run_dir / "cache")["vae"]["fingerprint"]
    assert cached_vae == read_manifest(tiny.cache)["vae"]["fingerprint"]
    teacher = results["teacher"]
    assert teacher["shipped"] == str(out) and teacher["fit_seconds"] == 12.0
    assert teacher["manifest"]["score"] == {"overall": 0.5}
    assert 0.0 <= teacher["validate"]["val/geneval/overall"] <= 1.0
    assert not (run_dir / "teacher" / "FINISHED").exists()  # validated, not trained
    # every student distilled the shipped teacher's weights
    shipped_sha = weights_hash(load_teacher(str(out / "teacher.yaml"), None).network)
    runs = results["student"]["methods"]
    assert list(runs) == list(METHODS) and results["student"]["method"] == "ladd"
    for method in METHODS:
        ckpt = torch.load(
            run_dir / f"student_{method}" / "checkpoints" / "last.ckpt", weights_only=False
        )
        assert ckpt["teacher"]["sha256"] == shipped_sha, method
        assert ckpt["teacher"]["config"] == str(out / "teacher.yaml"), method
        assert runs[method]["fit_seconds"] > 0 and "val/student_1/nfe" in runs[method]["validate"]
    # same prompts, noise and teacher: both validations measured the same teacher figures
    teachers = [
        {k: v for k, v in runs[m]["validate"].items() if k.startswith("val/teacher/geneval")}
        for m in METHODS
    ]
    assert teachers[0] and teachers[0] == teachers[1]
    report = (run_dir / "report.md").read_text()
    table = (run_dir / METHODS_TABLE).read_text()
    assert f"## {TITLE}" in report and table.strip() in report
    assert f"shipped {out}: GenEval overall" in report  # the stage table names the teacher
    assert "| teacher (shipped) |" in table and "| lcm | 4 | not run |" in table
    assert "largest difference 0.000" in table


def test_the_demo_distils_a_shipped_mmdit_teacher(tmp_path, monkeypatch):
    """An MMDiT (FLUX.1 blocks) teacher shipped with `fewstep ship`: the demo validates it and
    distils it with the pooled text vector its teacher.yaml names (the mean MiniLM token)."""
    root = tmp_path / "flux"
    vae = build_tiny_vae(root / "vae")
    tiny = train_flux_teacher(root, build_tiny_cache(root / "cache", vae, 16), vae, False)
    out = root / "reference"
    args = ["--config", str(tiny.config), "--ckpt_path", str(tiny.ckpt), "--out", str(out)]
    run(["ship", *args, "--info", json.dumps({"score": {"overall": 0.5}})])
    run_dir = tmp_path / "demo"
    configs = tiny_configs(tmp_path / "configs", run_dir, tiny, ("lcm",))
    profile = dataclasses.replace(demo.PROFILES["cpu"], run_dir=run_dir, configs_dir=configs)
    monkeypatch.setitem(demo.PROFILES, "cpu", profile)
    for name in ("FEWSTEP_DEMO_PROFILE", "FEWSTEP_DEMO_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", str(out))
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm")
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "cache,teacher,student,report")
    assert "--data.init_args.pooled_text=mean_tokens" in demo._teacher_overrides()
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert 0.0 <= results["teacher"]["validate"]["val/geneval/overall"] <= 1.0
    ckpt = torch.load(run_dir / "student_lcm" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["teacher"]["sha256"] == weights_hash(
        load_teacher(str(out / "teacher.yaml"), None).network
    )
    assert "val/student_1/nfe" in results["student"]["methods"]["lcm"]["validate"]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


def test_a_changed_shipped_file_stops_the_demo_before_any_stage(demo_on, tmp_path, monkeypatch):
    run_dir, out = demo_on
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = next((copy / "transformer").glob("*.safetensors"))
    _flip_last_byte(weights)
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", str(copy))
    name = weights.relative_to(copy).as_posix()
    with pytest.raises(SystemExit, match=f"FEWSTEP_DEMO_TEACHER=.*{name} has sha256"):
        demo.main()
    assert not (run_dir / "results.json").exists()


def test_a_folder_that_is_not_a_shipped_teacher_is_one_clear_error(demo_on, monkeypatch, shipped):
    tiny, _ = shipped
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", str(tiny.vae))
    with pytest.raises(SystemExit, match="not a shipped teacher.*fewstep ship"):
        demo.main()


def test_a_run_folder_of_another_teacher_is_refused(demo_on, monkeypatch):
    run_dir, _ = demo_on
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps({"teacher": {}, "source": "train"}))
    with pytest.raises(SystemExit, match="holds the demo of .train., not of .shipped:.*mv "):
        demo.main()


def image_folder(folder: Path, count: int = 24) -> Path:
    """``count`` random 64 px images with captions (metadata.jsonl), no shapes-world specs."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": f"texture number {i % 5}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_demo_on_an_image_folder_reports_distribution_measures_only(demo_on, tmp_path, monkeypatch):
    run_dir, _ = demo_on
    folder = image_folder(tmp_path / "my_images")
    monkeypatch.setenv("FEWSTEP_DEMO_DATA", str(folder))
    monkeypatch.setenv("FEWSTEP_DEMO_STUDENT", "lcm")
    monkeypatch.setenv("FEWSTEP_DEMO_STAGES", "shapes,cache,teacher,student,report")
    demo.main()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["shapes"]["images"] == 24 and results["source"].endswith(f"data:{folder}")
    cache = LatentCache(run_dir / "cache")
    assert len(cache) == 24 and cache.read_records([3])[0]["caption"] == "texture number 3"
    validate = results["student"]["methods"]["lcm"]["validate"]
    assert not any("geneval" in k for k in validate)  # no specs: nothing to score
    assert validate["val/student_1/fd_teacher"] >= 0 and validate["val/teacher/fd_data"] >= 0
    table = (run_dir / METHODS_TABLE).read_text()
    assert "prompt score ±" not in table and NO_SCORES in table
    assert "| lcm | 1 | " in table and "| lcm | 1 | not run" not in table


def test_a_vae_trained_here_learns_the_folder_images(tmp_path, monkeypatch, capsys):
    """FEWSTEP_DEMO_DATA with FEWSTEP_DEMO_TEACHER=train: the VAE fit reads the folder."""
    folder = image_folder(tmp_path / "my_images", count=2)
    profile = dataclasses.replace(demo.PROFILES["cpu"], run_dir=tmp_path / "demo")
    monkeypatch.setitem(demo.PROFILES, "cpu", profile)
    monkeypatch.delenv("FEWSTEP_DEMO_PROFILE", raising=False)
    monkeypatch.setenv("FEWSTEP_DEMO_TEACHER", "train")
    monkeypatch.setenv("FEWSTEP_DEMO_DATA", str(folder))
    calls = []
    monkeypatch.setattr(demo, "_cli", calls.append)
    assert demo.stage_vae() == {"data": str(folder), "vae": str(tmp_path / "demo" / "vae")}
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run([*calls[0], "--print_config"])
    data = yaml.safe_load(capsys.readouterr().out)["data"]["init_args"]
    for split in ("train", "val"):
        assert data[split]["class_path"] == demo.IMAGE_FOLDER
        assert data[split]["init_args"]["root"] == str(folder)
        assert data[split]["init_args"]["resolution"] == 64
