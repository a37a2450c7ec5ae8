"""`fewstep cache`: encode a dataset into the latent/text-embedding cache that the teacher
and the student train on."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

from fewstep.data.cache import read_manifest
from fewstep.data.cache_builder import build_cache
from fewstep.models.flux_text import FluxTextEncoder
from fewstep.models.text_encoder import TextEncoder
from fewstep.models.vae import VAE


def build(
    dataset: Dataset,
    vae: VAE,
    text_encoder: TextEncoder | FluxTextEncoder,
    out: str = "runs/demo/cache",
    shard_size: int = 1024,
    batch_size: int = 64,
    dtype: str = "float16",
    num_workers: int = 0,
    device: str = "auto",
) -> dict[str, str]:
    """Build (or resume building) a cache at ``out``; rerunning skips finished shards. A
    FluxTextEncoder also stores each caption's pooled CLIP vector (``pooled_text.npy``)."""
    if vae.scaling_factor is None or float(vae.scaling_factor) == 1.0:
        print("note: the VAE has no measured latent scale (scaling_factor 1.0)")
    target = torch.device(
        "cuda"
        if device == "auto" and torch.cuda.is_available()
        else "cpu"
        if device == "auto"
        else device
    )
    vae = vae.to(target).eval()
    text_encoder = text_encoder.to(target)
    with torch.inference_mode():
        path = build_cache(
            dataset,
            vae,
            text_encoder,
            out,
            shard_size=shard_size,
            batch_size=batch_size,
            dtype=dtype,
            num_workers=num_workers,
        )
    return {"cache": str(Path(path)), **build_summary(path)}


def build_summary(path: str | Path) -> dict[str, object]:
    """What the manifest of a finished build says was cached, skipped and cut."""
    manifest = read_manifest(Path(path))
    skipped = manifest.get("skipped", [])
    return {
        "num_samples": manifest["num_samples"],
        "skipped": len(skipped),
        "skipped_examples": [item["reason"] for item in skipped[:5]],
        "truncated_captions": manifest.get("truncated_captions", 0),
    }
