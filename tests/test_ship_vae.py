"""`fewstep ship-vae`: a trained VAE folder becomes a shipped folder whose files are the
trained ones byte for byte, with its reconstruction figures and a sha256 manifest that loading
checks; an existing folder is never overwritten by accident."""

import json
import math
from pathlib import Path

import pytest
import torch
from student_fixtures import build_tiny_vae

from fewstep.cli import run
from fewstep.data.images import collate_samples
from fewstep.data.shapes import ShapesWorld
from fewstep.models.vae import VAE
from fewstep.utils.manifest import ShippedModelError, sha256_file

NUM = 8
NOTE = "seed 0 gave 92 % on 600 renders: the recipe varies by seed"  # a YAML reader splits it


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ship_vae")
    trained = build_tiny_vae(root / "trained")
    config = root / "config.yaml"
    config.write_text("model:\n  class_path: fewstep.lightning.vae_module.VAEModule\n")
    info = json.dumps({"global_step": 3000, "train_seconds": 900, "note": NOTE})
    out = root / "assets" / "reference_vae"
    run(
        ["ship-vae", "--vae", str(trained), "--config", str(config), "--out", str(out)]
        + ["--num_samples", str(NUM), "--info", info]
    )
    return trained, out


def slow_psnr(vae: VAE) -> float:
    """10 log10(peak-to-peak^2 / MSE) over every pixel of the held-out reconstructions."""
    images = collate_samples([ShapesWorld(size=NUM, seed=123)[i] for i in range(NUM)])["image"]
    with torch.no_grad():
        recon = vae.decode_raw(vae.encode_moments(images)[0]).clamp(-1, 1)
    return 10 * math.log10(4 / float(((recon - images) ** 2).mean()))


def test_the_shipped_files_are_the_trained_ones_with_recipe_figures_and_cost(shipped):
    trained, out = shipped
    manifest = json.loads((out / "manifest.json").read_text())
    names = {"config.json", "diffusion_pytorch_model.safetensors"}
    assert set(manifest["files"]) == names
    for name in names:
        assert manifest["files"][name] == sha256_file(trained / name)
    assert manifest["recipe"]["fit_config"]["model"]["class_path"].endswith("VAEModule")
    assert manifest["global_step"] == 3000 and manifest["train_seconds"] == 900
    assert manifest["note"] == NOTE  # verbatim
    figures = manifest["reconstruction"]
    assert figures["num_samples"] == NUM and figures["seed"] == 123
    assert {"overall", "overall_se"} <= set(figures["geneval"])
    assert figures["psnr_db"] == pytest.approx(
        slow_psnr(VAE(pretrained_path=str(trained))), abs=1e-3
    )


def test_a_changed_shipped_vae_is_one_clear_error(shipped, tmp_path):
    _, out = shipped
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in out.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    VAE(pretrained_path=str(copy))  # intact: loads
    config = copy / "config.json"
    config.write_text(config.read_text() + " ")  # still valid JSON, one byte more
    with pytest.raises(ShippedModelError, match="config.json has sha256"):
        VAE(pretrained_path=str(copy))


def test_an_existing_folder_or_a_folder_without_a_vae_is_refused(shipped, tmp_path):
    trained, out = shipped
    before = (out / "manifest.json").read_bytes()
    args = ["--config", str(trained / "config.json"), "--num_samples", "2"]
    with pytest.raises(SystemExit, match=f"--out {out} exists"):
        run(["ship-vae", "--vae", str(trained), "--out", str(out), *args])
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(SystemExit, match=f"--vae {tmp_path}: no config.json"):
        run(["ship-vae", "--vae", str(tmp_path), "--out", str(tmp_path / "new"), *args])
    assert not (tmp_path / "new").exists()
    for info, error in (
        ("{score: 1", "--info is not JSON"),
        ("[1]", "--info must be a JSON object"),
    ):
        with pytest.raises(SystemExit, match=error):
            run(
                ["ship-vae", "--vae", str(trained), "--out", str(tmp_path / "new"), *args]
                + ["--info", info]
            )
    assert not (tmp_path / "new").exists()
