"""Render a sample of the shapes world, export it as an image–caption folder, write a
captioned grid, and score the renders with the GenEval-protocol scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from fewstep.data.image_folder import write_image_folder
from fewstep.data.shapes import ShapesWorld
from fewstep.eval.geneval import GenEvalReport, score_image
from fewstep.eval.grid import captioned_grid


def degrade(image: np.ndarray, rng: np.random.Generator, blur: float = 1.0, noise: float = 0.05):
    """Gaussian blur (sigma in pixels) plus additive Gaussian noise, clipped to [0,1]."""
    blurred = ndimage.gaussian_filter(image, sigma=(blur, blur, 0))
    return np.clip(blurred + rng.normal(0, noise, image.shape), 0, 1).astype(np.float32)


def score_renders(world: ShapesWorld, n: int, degraded: bool, seed: int = 0) -> GenEvalReport:
    """Scorer accuracy on n ground-truth renders (optionally blurred + noisy)."""
    rng = np.random.default_rng(seed)
    report = GenEvalReport()
    for i in range(n):
        image, spec, _ = world.render(i)
        if degraded:
            image = degrade(image, rng)
        report.add(spec["category"], score_image(image, spec)[0])
    return report


def preview(
    out: str = "runs/demo/shapes",
    num_samples: int = 36,
    num_scored: int = 300,
    resolution: int = 64,
    seed: int = 0,
    overwrite: bool = True,
) -> dict[str, dict[str, float]]:
    """Write grid.png, an image folder and scores.json under ``out``; return the scores."""
    out_dir = Path(out)
    world = ShapesWorld(size=max(num_samples, num_scored), resolution=resolution, seed=seed)
    samples = [world[i] for i in range(num_samples)]
    images = [world.render(i)[0] for i in range(num_samples)]
    out_dir.mkdir(parents=True, exist_ok=True)
    captioned_grid(images, [s["caption"] for s in samples]).save(out_dir / "grid.png")
    write_image_folder(samples, out_dir / "images", progress=False, overwrite=overwrite)
    scores = {
        "clean": score_renders(world, num_scored, degraded=False).as_dict(),
        "blur1+noise0.05": score_renders(world, num_scored, degraded=True).as_dict(),
    }
    (out_dir / "scores.json").write_text(json.dumps(scores, indent=2))
    return scores
