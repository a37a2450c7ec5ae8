"""Semantic fidelity of an autoencoder: GenEval-protocol accuracy on reconstructions of
ground-truth shapes-world renders."""

from __future__ import annotations

import torch

from fewstep.data.images import collate_samples
from fewstep.data.shapes import ShapesWorld
from fewstep.eval.geneval import ShapesGenEval
from fewstep.models.vae import VAE


@torch.no_grad()
def reconstruction_geneval(
    vae: VAE, world: ShapesWorld, num_samples: int = 240, batch_size: int = 32
) -> dict[str, float]:
    """Per-category and overall scorer accuracy on posterior-mean reconstructions."""
    metric = ShapesGenEval()
    device = next(vae.parameters()).device
    for start in range(0, num_samples, batch_size):
        batch = collate_samples(
            [world[i] for i in range(start, min(start + batch_size, num_samples))]
        )
        mean, _ = vae.encode_moments(batch["image"].to(device))
        recon = vae.decode_raw(mean).clamp(-1, 1)
        metric.update(recon, [m["spec"] for m in batch["metadata"]])
    return {k: float(v) for k, v in metric.compute().items()}
