"""Every YAML in configs/ runs through the CLI on CPU with tiny sizes (test tier 1)."""

from pathlib import Path

import pytest

from fewstep.cli import main
from fewstep.data.cache import read_manifest
from fewstep.models.vae import VAE

CONFIGS = Path(__file__).parents[1] / "configs"
# configs/model/dit/*.yaml are network presets, instantiated in tests/test_dit.py.
RUNNERS = {"shapes", "vae", "cache", "model"}


def yamls(stage: str) -> list[Path]:
    return sorted((CONFIGS / stage).rglob("*.yaml"))


def test_every_config_folder_has_a_runner():
    stages = {p.relative_to(CONFIGS).parts[0] for p in CONFIGS.rglob("*.yaml")}
    assert stages <= RUNNERS | {"teacher"}, stages - RUNNERS


@pytest.fixture(scope="module")
def tiny_vae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vae")
    vae = VAE(block_out_channels=(8, 16, 16), norm_num_groups=4)
    vae.set_latent_scale(0.5, 0.0)
    vae.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("path", yamls("shapes"), ids=lambda p: p.name)
def test_shapes_configs(path, tmp_path):
    main(["shapes", "-c", str(path), "--out", str(tmp_path), "--num_samples", "4",
          "--num_scored", "12"])
    assert (tmp_path / "grid.png").exists() and (tmp_path / "scores.json").exists()


@pytest.mark.parametrize("path", yamls("vae"), ids=lambda p: p.name)
def test_vae_configs(path, tmp_path):
    export = tmp_path / "vae"
    main(["fit", "-c", str(path), "--trainer.fast_dev_run=true",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.accelerator=cpu",
          "--data.init_args.batch_size=2", "--data.init_args.train.init_args.size=8",
          "--data.init_args.val.init_args.size=4", "--model.init_args.measure_scale_batches=2",
          "--model.init_args.export_dir", str(export)])
    restored = VAE.from_pretrained(export)
    assert restored.has_latent_scale


@pytest.mark.parametrize("path", yamls("cache"), ids=lambda p: p.name)
def test_cache_configs(path, tmp_path, tiny_vae_dir):
    out = tmp_path / "cache"
    main(["cache", "-c", str(path), "--out", str(out), "--device=cpu",
          "--vae.init_args.pretrained_path", str(tiny_vae_dir),
          "--dataset.init_args.size=10", "--shard_size=4", "--batch_size=4"])
    manifest = read_manifest(out)
    assert manifest["num_samples"] == 10 and len(manifest["shards"]) == 3
