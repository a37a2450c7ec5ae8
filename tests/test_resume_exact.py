"""Exact resume with the real CachedLatentDataModule: a fit stopped mid-epoch (several batches
per epoch, several stop points, across an epoch boundary) and resumed from its checkpoint ends
bit-identical to an uninterrupted run — weights, EMA, optimiser state — for the teacher and
every student method. Data order, CFG text dropout and noise all depend on (seed, epoch, step)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from student_fixtures import (
    CONFIGS,
    TinyTeacher,
    build_tiny_teacher,
    checkpoint_every,
    couplings_args,
    cpu_student_config,
)

from fewstep.cli import run

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyTeacher:
    return build_tiny_teacher(tmp_path_factory.mktemp("resume_teacher"), "flow")


def _keep_every_step(config: Path) -> Path:
    """Checkpoint every step and keep all of them (save_top_k=-1), without validation."""
    checkpoint_every(config, 1, limit_val_batches=0, log_every_n_steps=1)
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["save_top_k"] = -1
    config.write_text(yaml.safe_dump(data))
    return config


def _teacher_config(tiny: TinyTeacher, out: Path) -> Path:
    """The tiny teacher's fit YAML with an EMA, a TensorBoard logger under ``out`` and
    text dropout 0.3 (so the dropout RNG matters)."""
    data = yaml.safe_load(tiny.config.read_text())
    data["data"]["init_args"]["text_dropout"] = 0.3
    logger = {"save_dir": str(out), "name": "teacher", "version": ""}
    data["trainer"] = {
        "accelerator": "cpu",
        "enable_progress_bar": False,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": logger,
        },
        "callbacks": [
            {"class_path": "fewstep.lightning.ema.EMA", "init_args": {"decay": 0.9}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True},
            },
        ],
    }
    path = out / "teacher.yaml"
    path.write_text(yaml.safe_dump(data))
    return _keep_every_step(path)


def _student_config(name: str, tiny: TinyTeacher, out: Path) -> Path:
    config = cpu_student_config(CONFIGS / f"student/{name}", tiny, out)
    return _keep_every_step(config)


def _couplings(tiny: TinyTeacher, out: Path) -> Path:
    """24 couplings of the tiny teacher (18 train: 4 batches of 4 per epoch)."""
    run(couplings_args(tiny, out, num_samples=24, shard=8))
    return out


def _assert_same(a: object, b: object, where: str = "") -> None:
    """Nested equality at zero tolerance (tensors with torch.equal)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")


def _state(ckpt: Path) -> dict:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    return {
        "state_dict": saved["state_dict"],
        "optimizer_states": saved["optimizer_states"],
        "ema": {k: v for k, v in saved["callbacks"].items() if k.startswith("EMA")},
        "global_step": saved["global_step"],
    }


def _check_resume(config: Path, extra: list[str], total: int, stops: list[int]) -> None:
    """Fit ``total`` steps uninterrupted; then, for each stop, resume from the checkpoint at
    that step and compare the final states."""
    fit = ["fit", "-c", str(config), *extra]
    run([*fit, f"--trainer.max_steps={total}"])
    folder = next(config.parent.rglob("checkpoints"))
    kept = config.parent / "kept"
    shutil.copytree(folder, kept)
    reference = _state(kept / "last.ckpt")
    assert reference["global_step"] == total
    for stop in stops:
        start = next(kept.glob(f"epoch=*-step={stop}.ckpt"))
        run([*fit, f"--trainer.max_steps={total}", "--ckpt_path", str(start)])
        _assert_same(_state(folder / "last.ckpt"), reference, f"resumed at {stop}")


def test_teacher_resumes_exactly_mid_epoch(tiny, tmp_path):
    # 18 training samples, batch 4, drop_last: 4 batches per epoch; stops mid-epoch 0 and 1
    _check_resume(_teacher_config(tiny, tmp_path), [], total=7, stops=[2, 5])


@pytest.mark.parametrize("name", ["lcm_shapes.yaml", "ladd_shapes.yaml", "guidance_shapes.yaml"])
def test_student_resumes_exactly_mid_epoch(name, tiny, tmp_path):
    per_batch = 2 if "ladd" in name else 1  # LADD: two optimiser steps per batch
    stops = [2 * per_batch, 5 * per_batch]
    _check_resume(_student_config(name, tiny, tmp_path), [], total=7 * per_batch, stops=stops)


def test_reflow_student_resumes_exactly_mid_epoch(tiny, tmp_path):
    couplings = _couplings(tiny, tmp_path / "couplings")
    (tmp_path / "student").mkdir()
    config = _student_config("reflow_shapes.yaml", tiny, tmp_path / "student")
    extra = ["--data.init_args.path", str(couplings)]
    _check_resume(config, extra, total=7, stops=[2, 5])


def test_vae_resumes_exactly_mid_epoch(tmp_path):
    # 12 shapes images, batch 4: 3 batches per epoch; posterior sampling and random crops on
    data = yaml.safe_load((CONFIGS / "vae/shapes.yaml").read_text())
    data["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    data["trainer"].update(accelerator="cpu", enable_progress_bar=False)
    data["model"]["init_args"].update(
        export_dir=str(tmp_path / "export"), sample_posterior=True, train_crop=16
    )
    data["data"]["init_args"].update(batch_size=4)
    data["data"]["init_args"]["train"]["init_args"]["size"] = 12
    data["data"]["init_args"]["val"]["init_args"]["size"] = 4
    config = tmp_path / "vae.yaml"
    config.write_text(yaml.safe_dump(data))
    _keep_every_step(config)
    _check_resume(config, ["--model.init_args.measure_scale_batches=1"], total=7, stops=[2, 4])


def test_progressive_student_resumes_exactly_across_a_round(tiny, tmp_path):
    # rounds of 3 steps: the round-1 teacher (the round-0 student at step 3) is in the checkpoint
    config = _student_config("progressive_shapes.yaml", tiny, tmp_path)
    extra = [
        "--model.init_args.method.init_args.rounds=[2, 1]",
        "--model.init_args.method.init_args.steps_per_round=3",
    ]
    _check_resume(config, extra, total=7, stops=[2, 5])
