"""`fewstep ship`: a trained teacher as a checked, shipped folder that students load directly."""

import json
import shutil

import pytest
import torch
import yaml
from student_fixtures import build_tiny_teacher

from fewstep.cli import run
from fewstep.lightning.checkpoints import load_trained
from fewstep.lightning.student_module import load_teacher
from fewstep.tools.ship import shipped_teacher_yaml
from fewstep.utils.fingerprint import weights_hash
from fewstep.utils.manifest import ShippedModelError


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    teacher = build_tiny_teacher(tmp_path_factory.mktemp("ship_teacher"), "flow")
    out = tmp_path_factory.mktemp("assets") / "reference"
    info = json.dumps({"score": {"overall": 0.5, "prompts": 4}, "train_seconds": 1.0})
    args = ["--config", str(teacher.config), "--ckpt_path", str(teacher.ckpt), "--out", str(out)]
    run(["ship", *args, "--info", info])
    return teacher, out


def test_shipped_teacher_loads_without_a_checkpoint_and_equals_the_trained_one(shipped):
    teacher, out = shipped
    trained, _, weights = load_trained(teacher.config, teacher.ckpt, ema=True)
    assert weights == "ema"
    loaded = load_teacher(str(out / "teacher.yaml"), None)
    mine, theirs = loaded.network.state_dict(), trained.network.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert loaded.guidance_scale == trained.guidance_scale
    assert type(loaded.process) is type(trained.process)
    assert loaded.vae_path == str(out.resolve() / "vae")


def test_manifest_holds_recipe_score_and_every_file(shipped):
    _, out = shipped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["score"] == {"overall": 0.5, "prompts": 4}
    assert manifest["recipe"]["weights"] == "ema" and "model" in manifest["recipe"]["fit_config"]
    assert {"teacher.yaml", "vae/config.json", "transformer/config.json"} <= set(manifest["files"])


def test_a_changed_shipped_weight_is_one_clear_error(shipped, tmp_path):
    teacher, _ = shipped
    copy = tmp_path / "reference"
    run(
        [
            "ship",
            "--config",
            str(teacher.config),
            "--ckpt_path",
            str(teacher.ckpt),
            "--out",
            str(copy),
        ]
    )
    weights = next((copy / "transformer").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedModelError, match="transformer/.*safetensors has sha256"):
        load_teacher(str(copy / "teacher.yaml"), None)


def test_a_shipped_teacher_loads_after_moving_from_any_working_directory(
    shipped, tmp_path, monkeypatch
):
    teacher, _ = shipped
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    args = ["--config", str(teacher.config), "--ckpt_path", str(teacher.ckpt)]
    run(["ship", *args, "--out", "assets/reference"])  # a relative --out
    args = yaml.safe_load((tmp_path / "here/assets/reference/teacher.yaml").read_text())
    args = args["model"]["init_args"]
    assert (args["network"]["init_args"]["path"], args["vae_path"]) == (".", "vae")
    moved = tmp_path / "package" / "assets" / "reference"
    shutil.move(tmp_path / "here" / "assets" / "reference", moved)  # e.g. into fewstep/assets
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_teacher(str(moved / "teacher.yaml"), None)
    trained, _, _ = load_trained(teacher.config, teacher.ckpt, ema=True)
    assert loaded.vae_path == str(moved.resolve() / "vae") and loaded.vae is not None
    mine, theirs = loaded.network.state_dict(), trained.network.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_couplings_draw_from_a_shipped_teacher_without_a_checkpoint(shipped, tmp_path):
    teacher, out = shipped
    trained, _, _ = load_trained(teacher.config, teacher.ckpt, ema=True)
    couplings = tmp_path / "couplings"
    result = run(
        [
            "couplings",
            "--teacher_config",
            str(out / "teacher.yaml"),
            "--teacher_ckpt",
            "null",
            "--cache",
            str(teacher.cache),
            "--out",
            str(couplings),
            "--num_samples=4",
            "--shard_size=4",
            "--batch_size=4",
            "--device=cpu",
            "--progress=false",
        ]
    )
    assert result == {"couplings": str(couplings), "teacher_weights": "shipped:ema"}
    info = json.loads((couplings / "manifest.json").read_text())["couplings"]["teacher"]
    assert info["weights_sha256"] == weights_hash(trained.network)  # the trained EMA weights
    assert info["weights"] == "shipped:ema"


@pytest.mark.parametrize(
    ("pooled", "kept"), [("mean_tokens", True), ("cache", False), (None, False)]
)
def test_a_derived_pooled_text_setting_travels_with_the_shipped_teacher(tmp_path, pooled, kept):
    data = {"init_args": {"path": "cache", "pooled_text": pooled}} if pooled else {}
    fit = {
        "model": {
            "class_path": "fewstep.lightning.teacher_module.TeacherModule",
            "init_args": {"network": {"class_path": "x"}, "optimizer": {"class_path": "y"}},
        },
        "data": data,
    }
    config = tmp_path / "fit.yaml"
    config.write_text(yaml.safe_dump(fit))
    shipped = shipped_teacher_yaml(config, tmp_path / "out", family="flux")
    assert "optimizer" not in shipped["model"]["init_args"]
    assert shipped["model"]["init_args"]["vae_path"] == "vae"
    if kept:
        assert shipped["data"] == {"init_args": {"pooled_text": pooled}}
    else:
        assert "data" not in shipped
