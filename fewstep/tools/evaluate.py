"""`fewstep evaluate`: score generated images with metrics from a YAML (FID, KID, CMMD,
CLIPScore, HPSv2, GenEval with a detector; weights from local paths): a folder of generated
images (captions and GenEval metadata in its ``metadata.jsonl``), or a checkpoint + a prompt
file, against a reference image folder or a latent cache's images. Writes ``metrics.json``
and ``metrics.md`` into ``out``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torchmetrics import Metric
from tqdm.auto import tqdm

from fewstep.data.cache import LatentCache
from fewstep.data.image_folder import ImageCaptionFolder
from fewstep.eval.metrics.inputs import metric_inputs, needs_reference, results_of, update_metric
from fewstep.models.vae import VAE
from fewstep.tools.generate_images import generate_images


def folder_batches(
    folder: str | Path, resolution: int, batch_size: int
) -> Iterator[tuple[Tensor, list[str], list[dict]]]:
    """(images [B, 3, R, R] in [-1, 1], captions, metadata) of an image-caption folder."""
    data = ImageCaptionFolder(folder, resolution=resolution)
    rows = (data[i] for i in range(len(data)))
    rows = [r for r in rows if "skipped" not in r]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        yield (
            torch.stack([r["image"] for r in chunk]),
            [r["caption"] for r in chunk],
            [r["metadata"] for r in chunk],
        )


def cache_batches(
    cache: str, vae_path: str | None, batch_size: int, device: str
) -> Iterator[Tensor]:
    """The images of a latent cache: its posterior means decoded by the VAE it was built with."""
    if vae_path is None:
        raise ValueError(
            "evaluate: reference_cache needs vae_path (the VAE the cache was built with)"
        )
    data, vae = LatentCache(cache), VAE.from_pretrained(vae_path).to(device).eval()
    for start in range(0, len(data), batch_size):
        idx = list(range(start, min(start + batch_size, len(data))))
        mean, _ = data.read_latents(idx)
        with torch.no_grad():
            yield vae.decode_raw(torch.from_numpy(mean).to(device).float()).clamp(-1, 1)


def markdown_table(results: dict[str, float], images: str, reference: str | None) -> str:
    """The results as a markdown table."""
    lines = [
        "# Evaluation",
        "",
        f"Generated: `{images}`; reference: `{reference or '–'}`.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in results.items()]
    return "\n".join(lines) + "\n"


def evaluate(
    metrics: dict[str, Metric],
    out: str,
    images: str | None = None,
    reference: str | None = None,
    reference_cache: str | None = None,
    vae_path: str | None = None,
    fit_config: str | None = None,
    ckpt_path: str | None = None,
    prompts: str | None = None,
    text_encoder_path: str | None = None,
    steps: int | None = None,
    resolution: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Score ``images`` (or what ``fit_config`` + ``ckpt_path`` generate for ``prompts``,
    written to ``out/images``) with ``metrics``; the distribution metrics compare with
    ``reference`` (an image folder) or ``reference_cache`` (decoded with ``vae_path``)."""
    for name, metric in metrics.items():
        metric_inputs(metric, name)  # one clear error for a metric fewstep cannot feed
    has_reference = reference is not None or reference_cache is not None
    if any(needs_reference(m) for m in metrics.values()) and not has_reference:
        raise ValueError("evaluate: FID/KID/CMMD need reference (a folder) or reference_cache")
    if images is None:
        if None in (fit_config, ckpt_path, prompts):
            raise ValueError(
                "evaluate: give images (a folder), or fit_config + ckpt_path + prompts (and "
                "text_encoder_path: the cache's text encoder; default the packaged MiniLM)"
            )
        images = str(generate_images(
            fit_config, ckpt_path, prompts, text_encoder_path, Path(out) / "images",
            steps, batch_size, device, seed, progress,
        ))  # fmt: skip
    for metric in metrics.values():
        metric.to(device)
    generated = folder_batches(images, resolution, batch_size)
    for batch, captions, meta in tqdm(generated, desc="generated", disable=not progress):
        batch = batch.to(device)
        for metric in metrics.values():
            if needs_reference(metric):
                metric.update(batch, real=False)
            else:
                update_metric(metric, batch, prompts=captions, metadata=meta)
    references = (
        (b for b, _, _ in folder_batches(reference, resolution, batch_size))
        if reference is not None
        else cache_batches(reference_cache, vae_path, batch_size, device)
        if reference_cache is not None
        else iter(())
    )
    for batch in tqdm(references, desc="reference", disable=not progress):
        for metric in metrics.values():
            if needs_reference(metric):
                metric.update(batch.to(device), real=True)
    results: dict[str, float] = {}
    for name, metric in metrics.items():
        results.update(results_of(name, metric.compute()))
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    (folder / "metrics.md").write_text(
        markdown_table(results, images, reference or reference_cache)
    )
    return results
