"""Couplings (noise z, teacher sample x0) for rectified flow (Liu et al. 2022, Alg. 1), stored
in the latent-cache format of :mod:`fewstep.data.cache`, and the DataModule that reads them.

A coupling cache is a latent cache whose ``latent_mean`` is the teacher's guided ODE sample in
the VAE's raw latent space (``x0 / scaling_factor + shift_factor``; ``latent_std`` is zero), with
an extra per-sample array ``noise.npy`` (the normalised noise z the sample was drawn from; its
sha256 is in the shard meta like every other file). Text embeddings, captions and metadata are
copied from the source cache, sample i from source index i, and the noise of sample i is
``fixed_noise(latent_shape, [i], seed)``: rerunning an interrupted build skips finished shards
and gives an identical cache. ``build.json``/``manifest.json`` hold the source cache's encoder
fingerprints plus a ``couplings`` block (teacher fingerprint, sampler, guidance scale, seed,
and ``pooled_text``: where the pooled text vector the teacher was given came from). A source cache
with pooled vectors (FLUX.1's CLIP one) has them copied into each shard like the text, so the
student trains with the ``cond`` its couplings were sampled with; couplings built before
``pooled_text`` was recorded read as "cache" (none for a cache without pooled vectors).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from fewstep.data import cache, cache_write
from fewstep.data.cache import CacheError, LatentCache, Verify
from fewstep.data.datamodule import (
    CachedLatentDataModule,
    CachedLatentDataset,
    PooledText,
    _empty,
    mean_tokens,
    pad_texts,
)
from fewstep.utils.seeding import fixed_noise

NOISE = "noise"  # the extra per-sample array: noise.npy
COUPLINGS = "couplings"  # the manifest block describing how the couplings were made
BUILD_HINT = "build it with `fewstep couplings -c configs/student/reflow_couplings_shapes.yaml`"

# (text [B, L, D] float32, text_mask [B, L] bool, noise [B, C, h, w], pooled text vector
# [B, Dv] float32 or None) -> x0 [B, C, h, w]
SampleFn = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


def coupling_config(
    source: LatentCache, num_samples: int, shard_size: int, info: dict[str, Any]
) -> dict[str, Any]:
    """build.json of a coupling cache: the source's encoders + the ``couplings`` block."""
    manifest = source.manifest
    return {
        "num_samples": num_samples,
        "shard_size": shard_size,
        "dtype": "float32",
        "vae": manifest["vae"],
        "text_encoder": manifest["text_encoder"],
        "preprocessing": manifest["preprocessing"],
        COUPLINGS: {
            **info,
            "noise": "fewstep.lightning.sampling.fixed_noise(latent_shape, [index], seed)",
            "source_cache": {
                "manifest_sha256": cache.file_sha256(source.root / cache.MANIFEST),
                "num_samples": len(source),
            },
        },
    }


def _raw_latents(x0: Tensor, source: LatentCache) -> np.ndarray:
    """Normalised samples -> raw VAE latents (inverse of the datamodule's normalisation)."""
    raw = (x0.detach().float().cpu() / source.scaling_factor + source.shift_factor).numpy()
    if not np.isfinite(raw).all():
        raise ValueError("the teacher produced non-finite samples; check the teacher checkpoint")
    return raw


def _shard_batches(start: int, stop: int, batch_size: int) -> list[list[int]]:
    """Index batches of one shard (the same partition on every run: resume-exact)."""
    return [list(range(a, min(a + batch_size, stop))) for a in range(start, stop, batch_size)]


def pooled_vectors(
    source: LatentCache, indices: Sequence[int], texts: Sequence[np.ndarray], pooled: PooledText
) -> np.ndarray | None:
    """The pooled text vectors [B, Dv] float32 the teacher is given for ``pooled`` (a resolved
    ``datamodule.pooled_source``: as CachedLatentDataModule makes them), or None."""
    if pooled == "mean_tokens":
        return mean_tokens(texts, source.text_dim)
    return source.read_pooled(indices) if pooled == "cache" else None


def sample_batch(
    source: LatentCache,
    sample: SampleFn,
    indices: Sequence[int],
    seed: int,
    max_text_length: int | None,
    device: torch.device | str,
    pooled: PooledText = "none",
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[dict[str, Any]], dict[str, np.ndarray]]:
    """(raw x0, noise, valid text tokens, records, the source's pooled vectors by array name if
    it stores any) of the couplings of source ``indices``; the teacher gets ``pooled``'s vectors."""
    texts = [t[:max_text_length] for t in source.read_texts(indices)]
    text, mask = pad_texts(texts, source.text_dim)
    noise = fixed_noise(source.latent_shape, indices, seed, device)
    vectors = pooled_vectors(source, indices, texts, pooled)
    cond = None if vectors is None else torch.from_numpy(vectors).to(device)
    x0 = sample(text.to(device), mask.to(device), noise, cond)
    records = [
        {**r, "cache_index": int(i)}
        for r, i in zip(source.read_records(indices), indices, strict=True)
    ]
    stored = {} if source.pooled is None else {source.pooled["array"]: source.read_pooled(indices)}
    texts_out = [np.array(t) for t in texts]
    return _raw_latents(x0, source), noise.cpu().numpy(), texts_out, records, stored


def build_couplings(
    source: LatentCache,
    sample: SampleFn,
    out_dir: str | Path,
    info: dict[str, Any],
    num_samples: int | None = None,
    seed: int = 0,
    shard_size: int = 1024,
    batch_size: int = 64,
    max_text_length: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    pooled: PooledText = "none",
) -> Path:
    """Write the couplings of source samples [0, num_samples) to ``out_dir`` (sharded, atomic,
    resumable); ``info`` (teacher fingerprint, sampler, guidance scale) goes in the manifest.
    ``pooled``: the teacher's pooled-vector source, resolved (``datamodule.pooled_source``)."""
    n = len(source) if num_samples is None else num_samples
    if not 1 <= n <= len(source) or shard_size < 1 or batch_size < 1:
        raise ValueError(
            f"couplings: num_samples={num_samples} must be in [1, {len(source)}] (the source "
            f"cache's size); shard_size={shard_size} and batch_size={batch_size} must be >= 1"
        )
    root = Path(out_dir)
    settings = {"seed": seed, "max_text_length": max_text_length, "pooled_text": pooled}
    config = coupling_config(source, n, shard_size, {**info, **settings})
    cache_write.start_cache(root, config, np.array(source.null_text()[:max_text_length]))
    sizes = [min(shard_size, n - k * shard_size) for k in range(-(-n // shard_size))]
    todo = [k for k, size in enumerate(sizes) if not cache_write.finished_shard(root, k, size)]
    done = n - sum(sizes[k] for k in todo)
    bar = tqdm(total=n, initial=done, unit="sample", desc="teacher couplings", disable=not progress)

    def where() -> str:
        return f"Couplings build into {root}"

    with cache_write.resumable_build(where, bar, root / "build-rank0.lock"):
        for k in todo:
            parts = []
            for indices in _shard_batches(k * shard_size, min((k + 1) * shard_size, n), batch_size):
                parts.append(
                    sample_batch(source, sample, indices, seed, max_text_length, device, pooled)
                )
                bar.update(len(indices))
            x0, noise, texts, records, stored = zip(*parts, strict=True)
            copied = {key: np.concatenate([s[key] for s in stored]) for key in stored[0]}
            cache_write.write_shard(
                root,
                k,
                np.concatenate(x0),
                np.zeros_like(np.concatenate(x0)),
                [t for ts in texts for t in ts],
                [r for rs in records for r in rs],
                extra={NOISE: np.concatenate(noise), **copied},
            )
    cache_write.merge_manifest(root)
    cache_write.clean_tmp_shards(root)
    return root


class CouplingDataset(CachedLatentDataset):
    """A cached-latent dataset that also yields each sample's coupled noise as ``noise``."""

    def _noise(self, cache_indices: np.ndarray) -> Tensor:
        noise = self.cache.read_array(NOISE, cache_indices)
        return _empty(noise.shape).copy_(torch.from_numpy(noise))

    def __getitem__(self, key: int) -> dict[str, Any]:
        sample = super().__getitem__(key)
        return {**sample, NOISE: self._noise(np.array([sample["index"]]))[0]}

    def __getitems__(self, keys: list[int]) -> dict[str, Any]:
        """A collated batch with ``noise`` [B, C, h, w] float32 beside ``latents`` (= x0)."""
        batch = super().__getitems__(keys)
        batch[NOISE] = self._noise(batch["index"].numpy())
        return batch


class CouplingDataModule(CachedLatentDataModule):
    """Batches of couplings for rectified-flow distillation (Liu et al. 2022): ``latents`` is the
    teacher's sample x0, ``noise`` the z it came from, plus text as CachedLatentDataModule.
    ``text_dropout`` defaults to 0: each x0 is the guided sample for its own caption.
    ``pooled_text`` None (default): the pooled vector ``cond`` as the couplings were sampled with
    (the manifest's ``couplings.pooled_text``; "cache" for older couplings)."""

    dataset_class = CouplingDataset

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        val_path: str | None = None,
        text_dropout: float = 0.0,
        verify: Verify = "first",
        seed: int = 0,
        drop_last: bool = True,
        max_text_length: int | None = None,
        expect_vae: dict[str, str] | None = None,
        expect_text: dict[str, str] | None = None,
        pin_memory: bool = False,
        pooled_text: PooledText | None = None,
    ) -> None:
        super().__init__(
            path,
            batch_size,
            num_workers,
            val_fraction,
            val_path,
            text_dropout,
            False,
            verify,
            seed,
            drop_last,
            max_text_length,
            expect_vae,
            expect_text,
            pin_memory,
            pooled_text,  # type: ignore[arg-type]  # None: resolved by the property below
        )

    @property
    def pooled_text(self) -> PooledText:
        """Where batches' ``cond`` comes from: as given, else as the couplings were sampled."""
        if self._pooled_text is None:
            return self.couplings.get("pooled_text", "cache")
        return self._pooled_text

    @pooled_text.setter
    def pooled_text(self, value: PooledText | None) -> None:
        self._pooled_text = value

    @property
    def couplings(self) -> dict[str, Any]:
        """How the couplings were made: teacher fingerprint, sampler, guidance scale, seed."""
        return self.cache.manifest[COUPLINGS]

    def setup(self, stage: str | None = None) -> None:
        """Open the coupling cache(s), refusing plain latent caches, then split train/val."""
        for path in (self.path, self.val_path):
            if path is not None:
                check_coupling_cache(self.cache if path == self.path else LatentCache(path, "none"))
        super().setup(stage)


def check_coupling_cache(latents: LatentCache) -> None:
    """Raise unless the cache holds couplings (a ``couplings`` block and noise in every shard)."""
    if COUPLINGS not in latents.manifest or not latents.has_array(NOISE):
        raise CacheError(
            f"{latents.root} is a latent cache without teacher couplings (no {NOISE}.npy per "
            f"shard); {BUILD_HINT}"
        )
