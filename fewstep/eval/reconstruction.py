"""Semantic fidelity of an autoencoder: GenEval-protocol accuracy (and PSNR) on reconstructions
of ground-truth shapes-world renders."""

from __future__ import annotations

import torch
from torchmetrics.image import PeakSignalNoiseRatio

from fewstep.data.images import collate_samples
from fewstep.data.shapes import ShapesWorld
from fewstep.eval.geneval import ShapesGenEval
from fewstep.models.vae import VAE


@torch.no_grad()
def reconstruction_fidelity(
    vae: VAE, world: ShapesWorld, num_samples: int = 240, batch_size: int = 32
) -> tuple[dict[str, float], float]:
    """Per-category and overall scorer accuracy on posterior-mean reconstructions of ``world``'s
    first ``num_samples`` renders, and their PSNR (dB, images in [-1, 1]) over all pixels, from
    one pass over the renders."""
    accuracy, psnr = ShapesGenEval(), PeakSignalNoiseRatio(data_range=2.0)
    device = next(vae.parameters()).device
    for start in range(0, num_samples, batch_size):
        batch = collate_samples(
            [world[i] for i in range(start, min(start + batch_size, num_samples))]
        )
        images = batch["image"].to(device)
        mean, _ = vae.encode_moments(images)
        recon = vae.decode_raw(mean).clamp(-1, 1)
        accuracy.update(recon, [m["spec"] for m in batch["metadata"]])
        psnr.update(recon.cpu(), images.cpu())
    return {k: float(v) for k, v in accuracy.compute().items()}, float(psnr.compute())


def reconstruction_geneval(
    vae: VAE, world: ShapesWorld, num_samples: int = 240, batch_size: int = 32
) -> dict[str, float]:
    """Per-category and overall scorer accuracy on posterior-mean reconstructions."""
    return reconstruction_fidelity(vae, world, num_samples, batch_size)[0]
