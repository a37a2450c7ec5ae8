"""Shipped model folders: loading checks every file against the manifest's sha256."""

import json

import pytest
import torch
from student_fixtures import build_tiny_vae

from fewstep.models.vae import VAE
from fewstep.utils.manifest import ShippedModelError, verify_shipped, write_manifest


@pytest.fixture()
def shipped(tmp_path):
    root = tmp_path / "reference"
    build_tiny_vae(root / "vae")
    write_manifest(root, {"recipe": {"vae": "configs/vae/shapes.yaml"}, "score": 0.95})
    return root


def test_manifest_records_every_file_and_the_recipe(shipped):
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vae/config.json", "vae/diffusion_pytorch_model.safetensors"}
    assert manifest["score"] == 0.95 and manifest["recipe"]["vae"].endswith("shapes.yaml")
    assert verify_shipped(shipped / "vae")["score"] == 0.95


def test_intact_shipped_vae_loads(shipped):
    vae = VAE(pretrained_path=str(shipped / "vae"))
    assert vae.has_latent_scale


def test_changed_weights_are_one_clear_error(shipped):
    weights = shipped / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(ShippedModelError, match="diffusion_pytorch_model.safetensors has sha256"):
        VAE(pretrained_path=str(shipped / "vae"))


def test_missing_file_is_named(shipped):
    (shipped / "vae" / "config.json").unlink()
    with pytest.raises(ShippedModelError, match="vae/config.json is missing"):
        verify_shipped(shipped / "vae")


def test_ordinary_folders_are_not_checked(tmp_path):
    build_tiny_vae(tmp_path / "vae")
    assert verify_shipped(tmp_path / "vae") is None
    assert isinstance(VAE(pretrained_path=str(tmp_path / "vae")).autoencoder, torch.nn.Module)
