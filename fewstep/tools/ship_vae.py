"""`fewstep ship-vae`: a trained VAE folder (the diffusers AutoencoderKL that VAEModule exports)
as a shipped model folder: the files copied byte for byte, their semantic fidelity measured on
held-out shapes-world renders (GenEval-protocol accuracy on reconstructions, with its standard
error, and PSNR), and a sha256 manifest with the recipe, those figures and the training cost.
Loading the folder (``VAE(pretrained_path=...)``) then checks every file's sha256."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from fewstep.data.shapes import ShapesWorld
from fewstep.eval.reconstruction import reconstruction_fidelity
from fewstep.models.vae import VAE
from fewstep.utils.manifest import manifest_info, write_manifest


def reconstruction_figures(
    vae: VAE, num_samples: int = 600, seed: int = 123, resolution: int = 64
) -> dict[str, Any]:
    """Scorer accuracy (per category, overall as GenEval's mean of categories, and its standard
    error ``overall_se``) and PSNR on reconstructions of ``num_samples`` held-out renders (seed
    ``seed``; training uses seed 0)."""
    world = ShapesWorld(size=num_samples, resolution=resolution, seed=seed)
    accuracy, psnr = reconstruction_fidelity(vae, world, num_samples=num_samples)
    return {"num_samples": num_samples, "seed": seed, "geneval": accuracy, "psnr_db": psnr}


def ship_vae(
    vae: str,
    config: str,
    out: str,
    info: str | None = None,
    num_samples: int = 600,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Ship the VAE folder ``vae`` trained by fit YAML ``config`` (the run's saved config.yaml
    reproduces it exactly) as ``out``; ``info``, a JSON object (steps, seconds...), goes into the
    manifest verbatim."""
    source, target = Path(vae), Path(out)
    if not (source / "config.json").is_file():
        raise SystemExit(f"--vae {source}: no config.json; give the folder a VAE run exported")
    if target.exists() and not overwrite:
        raise SystemExit(f"--out {target} exists; choose a new folder or pass --overwrite true")
    extra = manifest_info(info)  # a bad --info fails before any work
    model = VAE(pretrained_path=str(source)).eval()
    figures = reconstruction_figures(model, num_samples=num_samples)
    recipe = {"fit_config": yaml.safe_load(Path(config).read_text())}
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:  # the old folder is replaced only by a complete new one
        shutil.copytree(source, staging, dirs_exist_ok=True)
        write_manifest(
            staging, {"kind": "vae", "recipe": recipe, "reconstruction": figures, **extra}
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"shipped": str(target), **figures}
