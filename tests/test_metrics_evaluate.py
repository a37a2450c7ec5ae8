"""`fewstep evaluate` end to end on tiny folders: every metric from a YAML with tiny local
weights, JSON and markdown written, FID equal to the metric fed directly; and a checkpoint +
GenEval prompt file scored against a latent cache's images."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from student_fixtures import build_tiny_teacher
from tiny_metric_models import make_tiny_clip, make_tiny_hps, make_tiny_owlv2

from fewstep.cli import run
from fewstep.data.image_folder import ImageCaptionFolder, write_image_folder
from fewstep.eval.metrics import FID, ShapesFeatures
from fewstep.eval.metrics.geneval_prompts import geneval_suite

pytestmark = pytest.mark.usefixtures("one_thread")


def shapes_fid() -> dict:
    return {"class_path": "fewstep.eval.metrics.ShapesFeatures"}


def write_folder(folder, seed: int, meta: list[dict]) -> None:
    g = torch.Generator().manual_seed(seed)
    samples = [
        {"image": torch.rand(3, 32, 32, generator=g) * 2 - 1, "caption": m["prompt"], "metadata": m}
        for m in meta
    ]
    samples = [
        {**s, "metadata": {k: v for k, v in s["metadata"].items() if k != "prompt"}}
        for s in samples
    ]
    write_image_folder(samples, folder, progress=False)


def test_evaluate_scores_a_folder_with_every_metric(tmp_path) -> None:
    clip, owl = make_tiny_clip(tmp_path / "clip"), make_tiny_owlv2(tmp_path / "owl")
    hps = make_tiny_hps(tmp_path / "hps")
    meta = geneval_suite(per_task=1)[78:84]  # single objects, two objects, counting...
    write_folder(tmp_path / "generated", 0, meta)
    write_folder(tmp_path / "reference", 1, meta)
    config = {
        "metrics": {
            "fid": {
                "class_path": "fewstep.eval.metrics.FID",
                "init_args": {"feature": shapes_fid()},
            },
            "kid": {
                "class_path": "fewstep.eval.metrics.KID",
                "init_args": {"feature": shapes_fid(), "subsets": 2, "subset_size": 4},
            },
            "cmmd": {"class_path": "fewstep.eval.metrics.CMMD", "init_args": {"path": str(clip)}},
            "clip_score": {
                "class_path": "fewstep.eval.metrics.CLIPScore",
                "init_args": {"path": str(clip)},
            },
            "hps": {"class_path": "fewstep.eval.metrics.HPSv2", "init_args": {"path": str(hps)}},
            "geneval": {
                "class_path": "fewstep.eval.metrics.DetectorGenEval",
                "init_args": {"detector_path": str(owl), "clip_path": str(clip), "threshold": 0.0},
            },
        }
    }
    (tmp_path / "metrics.yaml").write_text(yaml.safe_dump(config))
    args = [
        "evaluate",
        "-c",
        str(tmp_path / "metrics.yaml"),
        "--images",
        str(tmp_path / "generated"),
    ]
    args += ["--reference", str(tmp_path / "reference"), "--out", str(tmp_path / "out")]
    results = run([*args, "--resolution=32", "--batch_size=4", "--progress=false"])
    expected = {"fid", "kid", "kid_std", "cmmd", "clip_score", "hps", "geneval/overall"}
    assert expected <= set(results)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == results
    table = (tmp_path / "out" / "metrics.md").read_text()
    assert "| fid |" in table and "| geneval/overall |" in table
    direct = FID(ShapesFeatures())
    for folder, real in (("reference", True), ("generated", False)):
        data = ImageCaptionFolder(tmp_path / folder, resolution=32)
        direct.update(torch.stack([data[i]["image"] for i in range(len(data))]), real=real)
    assert results["fid"] == pytest.approx(float(direct.compute()), rel=1e-5)


def test_evaluate_generates_from_a_checkpoint_and_a_prompt_file(tmp_path) -> None:
    teacher = build_tiny_teacher(tmp_path / "teacher")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(m) + "\n" for m in geneval_suite(per_task=1)[:3]))
    config = {
        "metrics": {
            "fid": {
                "class_path": "fewstep.eval.metrics.FID",
                "init_args": {"feature": shapes_fid()},
            }
        }
    }
    (tmp_path / "metrics.yaml").write_text(yaml.safe_dump(config))
    results = run(
        [
            "evaluate", "-c", str(tmp_path / "metrics.yaml"), "--fit_config", str(teacher.config),
            "--ckpt_path", str(teacher.ckpt), "--prompts", str(prompts),
            "--reference_cache", str(teacher.cache), "--vae_path", str(teacher.vae),
            "--out", str(tmp_path / "out"), "--resolution=64", "--progress=false",
        ]
    )  # fmt: skip
    written = ImageCaptionFolder(tmp_path / "out" / "images", resolution=64)
    assert len(written) == 3 and written[0]["metadata"]["tag"] == "single_object"
    assert results["fid"] >= 0.0


def test_evaluate_without_a_reference_is_one_clear_error(tmp_path) -> None:
    config = {
        "metrics": {
            "fid": {
                "class_path": "fewstep.eval.metrics.FID",
                "init_args": {"feature": shapes_fid()},
            }
        }
    }
    (tmp_path / "metrics.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="reference"):
        run(
            [
                "evaluate",
                "-c",
                str(tmp_path / "metrics.yaml"),
                "--images",
                str(tmp_path),
                "--out",
                str(tmp_path),
            ]
        )
