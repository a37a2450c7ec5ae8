"""Validation metrics from the YAML: the teacher's (vs the data) through ``fewstep validate``
with a ``metrics:`` section, and the student's (vs the data and vs the teacher's samples from
the same noise); the metric networks never enter the module's state dict."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from student_fixtures import build_tiny_teacher, quiet_trainer
from tiny_metric_models import make_tiny_clip

from fewstep.cli import run
from fewstep.data.datamodule import CachedLatentDataModule
from fewstep.diffusion import Euler
from fewstep.distill.consistency import ConsistencyDistillation
from fewstep.eval.metrics import FID, CLIPScore, ShapesFeatures
from fewstep.lightning.student_module import StudentModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny trained teacher (VAE, shapes cache, YAML, checkpoint) and a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("metrics_validation")
    return build_tiny_teacher(root / "teacher"), make_tiny_clip(root / "clip")


def metrics_yaml(clip) -> dict:
    return {
        "fid": {
            "class_path": "fewstep.eval.metrics.FID",
            "init_args": {"feature": {"class_path": "fewstep.eval.metrics.ShapesFeatures"}},
        },
        "clip_score": {
            "class_path": "fewstep.eval.metrics.CLIPScore",
            "init_args": {"path": str(clip)},
        },
        "cmmd": {"class_path": "fewstep.eval.metrics.CMMD", "init_args": {"path": str(clip)}},
    }


def test_teacher_validate_logs_the_yaml_metrics(world, tmp_path) -> None:
    teacher, clip = world
    overlay = tmp_path / "metrics.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"metrics": metrics_yaml(clip)}}}))
    cli = run(
        [
            "validate", "-c", str(teacher.config), "-c", str(overlay),
            "--ckpt_path", str(teacher.ckpt), "--trainer.limit_val_batches=1",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.accelerator=cpu",
        ]
    )  # fmt: skip
    logged = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"val/fid", "val/clip_score", "val/cmmd", "val/loss"} <= set(logged)
    assert logged["val/fid"] >= 0 and logged["val/cmmd"] > -1e-6 and logged["val/clip_score"] >= 0
    assert not any("val_metrics" in k or "inception" in k for k in cli.model.state_dict())


def test_student_metrics_against_the_data_and_the_teacher(world, tmp_path) -> None:
    teacher, clip = world
    torch.manual_seed(0)
    module = StudentModule(  # student_2 samples exactly as the teacher: same images
        str(teacher.config), str(teacher.ckpt), ConsistencyDistillation(), Euler(steps=2),
        eval_steps=[1, 2], vae_path=str(teacher.vae), val_num_samples=3, guidance_scale=1.0,
        teacher_sampler=Euler(steps=2),
        metrics={"fid": FID(ShapesFeatures()), "clip": CLIPScore(str(clip))},  # as from the YAML
    )  # fmt: skip
    data = CachedLatentDataModule(str(teacher.cache), batch_size=4, val_fraction=0.25)
    logger = TensorBoardLogger(tmp_path, name="student", version="")
    trainer = quiet_trainer(1, tmp_path, logger=logger, limit_val_batches=1)
    got = trainer.validate(module, data, verbose=False)[0]
    for key in ("teacher", "student_1", "student_2"):
        assert {f"val/{key}/fid", f"val/{key}/clip"} <= set(got)
    assert "val/teacher/fid_vs_teacher" not in got  # the teacher is not compared with itself
    assert got["val/student_2/fid_vs_teacher"] == pytest.approx(0.0, abs=1e-3)
    assert got["val/student_2/fid"] == pytest.approx(got["val/teacher/fid"], rel=1e-4, abs=1e-4)
    assert got["val/student_2/clip"] == pytest.approx(got["val/teacher/clip"], rel=1e-5)
    assert got["val/student_1/fid_vs_teacher"] > 0
    table = (tmp_path / "student" / "eval_table.md").read_text()
    assert "## Metrics" in table and "fid_vs_teacher" in table
    shared = module.val_metrics.copies
    assert shared["teacher"]["fid"].inception is shared["student_1|teacher"]["fid"].inception
