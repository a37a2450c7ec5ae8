"""CachedLatentDataModule: batches of normalised latents and padded text from a latent cache.

A batch is ``{"latents": [B,C,h,w] float32, "text": [B,L,D] float32 (zero padded),
"text_mask": [B,L] bool, "caption": list[str], "metadata": list[dict], "index": [B] long}``,
plus ``"cond": [B,Dv] float32`` (the pooled text vector, FLUX.1's CLIP one) when the cache
stores one or ``pooled_text="mean_tokens"`` asks for it. ``latents = (z - shift_factor) *
scaling_factor`` where ``z`` is the posterior mean (or a posterior sample with
``sample_posterior``). Whole batches are read at once (``__getitems__``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fewstep.data.cache import LatentCache, Verify, check_fingerprint
from fewstep.data.resumable import ResumableSampler, resumable_sampler
from fewstep.utils.seeding import mix_seed

# Where a batch's pooled text vector ("cond") comes from: "cache" = the stored one if the cache
# has it (a FLUX.1 cache), else none; "mean_tokens" = the mean of the valid text tokens (mean
# pooling, Reimers & Gurevych 2019: the MiniLM sentence embedding before normalisation), so that a
# network taking a pooled vector (Flux) trains on a single-encoder cache; "none" = never.
PooledText = Literal["cache", "mean_tokens", "none"]
# Batch entries that stay Python objects on the host: no step reads them on the device.
HOST_ONLY = ("caption", "metadata")


def _empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """Uninitialised tensor, in shared memory inside a DataLoader worker (as default_collate)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    proto = torch.empty(0, dtype=dtype)
    storage = proto._typed_storage()._new_shared(math.prod(shape), device=proto.device)
    return proto.new(storage).view(shape)


def pad_texts(texts: Sequence[np.ndarray], dim: int) -> tuple[Tensor, Tensor]:
    """Stack [L_i, D] token arrays into a zero-padded float32 [B, L, D] and a [B, L] mask."""
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    width = max(int(lengths.max(initial=0)), 1)
    padded = np.zeros((len(texts), width, dim), texts[0].dtype if len(texts) else np.float32)
    for row, tokens in zip(padded, texts, strict=True):
        row[: len(tokens)] = tokens
    mask = np.arange(width)[None, :] < lengths[:, None]  # [B, L]
    return _empty(padded.shape).copy_(torch.from_numpy(padded)), torch.from_numpy(mask)


def collate(batch: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """Pass through a batch from ``__getitems__``; pad and stack a list of single samples."""
    if isinstance(batch, dict):
        return batch
    text, mask = pad_texts([s["text"].numpy() for s in batch], batch[0]["text"].shape[-1])
    out = {
        "latents": torch.stack([s["latents"] for s in batch]),
        "text": text,
        "text_mask": mask,
        "caption": [s["caption"] for s in batch],
        "metadata": [s["metadata"] for s in batch],
        "index": torch.tensor([s["index"] for s in batch], dtype=torch.long),
    }
    if "cond" in batch[0]:
        out["cond"] = torch.stack([s["cond"] for s in batch])  # [B, Dv]
    return out


def mean_tokens(texts: Sequence[np.ndarray], dim: int) -> np.ndarray:
    """The mean of each sample's valid tokens [B, D] float32 (zeros for an empty text)."""
    out = np.zeros((len(texts), dim), np.float32)
    for row, tokens in zip(out, texts, strict=True):
        if len(tokens):
            row[:] = np.asarray(tokens, np.float32).mean(axis=0)
    return out


class CachedLatentDataset(Dataset):
    """Map-style view of (a subset of) a latent cache, with CFG text dropout and normalisation."""

    def __init__(
        self,
        cache: LatentCache,
        indices: Sequence[int] | None = None,
        text_dropout: float = 0.0,
        sample_posterior: bool = False,
        max_text_length: int | None = None,
        seed: int = 0,
        pooled_text: PooledText = "cache",
    ) -> None:
        self.cache = cache
        self.indices = np.arange(len(cache)) if indices is None else np.asarray(indices)
        self.text_dropout = text_dropout
        self.sample_posterior = sample_posterior
        self.max_text_length = max_text_length
        self.seed = seed
        self.null = cache.null_text()[:max_text_length]
        self.pooled_text = pooled_source(cache, pooled_text)
        self.null_pooled = null_pooled(cache, self.pooled_text, max_text_length)

    def __len__(self) -> int:
        return len(self.indices)

    def _generator(self, keys: np.ndarray) -> torch.Generator:
        """The RNG of one read: seeded by (seed, first draw key), so text dropout and posterior
        noise depend on (seed, epoch, sample) only, in any process and after any resume."""
        return torch.Generator().manual_seed(mix_seed(self.seed, int(keys[0])))

    def _latents(self, mean: np.ndarray, std: np.ndarray, generator: torch.Generator) -> Tensor:
        """Normalised latents (z - shift) * scale, z = mean (+ std * noise if sampling)."""
        z = _empty(mean.shape).copy_(torch.from_numpy(mean))
        if self.sample_posterior:
            noise = torch.randn(z.shape, generator=generator)
            z.addcmul_(torch.from_numpy(std).float(), noise)
        return z.sub_(self.cache.shift_factor).mul_(self.cache.scaling_factor)

    def _dropped(self, n: int, generator: torch.Generator) -> list[bool]:
        """Which of ``n`` samples lose their caption (CFG text dropout, prob. text_dropout): one
        draw from the read's generator, shared by the text and the pooled vector."""
        if self.text_dropout <= 0:
            return [False] * n
        return (torch.rand(n, generator=generator) < self.text_dropout).tolist()

    def _texts(self, cache_indices: np.ndarray, drop: list[bool]) -> list[np.ndarray]:
        """Valid tokens per sample, the null embedding where ``drop``."""
        texts = [t[: self.max_text_length] for t in self.cache.read_texts(cache_indices)]
        return [self.null if d else t for t, d in zip(texts, drop, strict=True)]

    def _pooled(
        self, cache_indices: np.ndarray, texts: list[np.ndarray], drop: list[bool]
    ) -> Tensor:
        """Pooled text vectors [B, Dv] float32, the null vector where ``drop`` (the same rows
        whose text was dropped)."""
        if self.pooled_text == "mean_tokens":
            pooled = mean_tokens(texts, self.cache.text_dim)  # dropped rows: mean of the null
        else:
            pooled = self.cache.read_pooled(cache_indices)
            pooled[np.asarray(drop, bool)] = self.null_pooled
        return _empty(pooled.shape).copy_(torch.from_numpy(pooled))

    def __getitem__(self, key: int) -> dict[str, Any]:
        """One sample as a batch of one, unstacked (see ``__getitems__``)."""
        batch = self.__getitems__([key])
        sample = {
            "latents": batch["latents"][0],
            "text": batch["text"][0][batch["text_mask"][0]],
            "caption": batch["caption"][0],
            "metadata": batch["metadata"][0],
            "index": int(batch["index"][0]),
        }
        if "cond" in batch:
            sample["cond"] = batch["cond"][0]
        return sample

    def __getitems__(self, keys: list[int]) -> dict[str, Any]:
        """A whole collated batch, read with one fancy-indexed memmap access per shard. Keys are
        positions in this dataset, or ResumableSampler's draw keys (epoch * len + position)."""
        keys_array = np.asarray(keys, dtype=np.int64)
        indices = self.indices[keys_array % len(self)]
        generator = self._generator(keys_array)
        drop = self._dropped(len(indices), generator)
        texts = self._texts(indices, drop)
        text, mask = pad_texts(texts, self.cache.text_dim)
        records = self.cache.read_records(indices)
        batch = {
            "latents": self._latents(*self.cache.read_latents(indices), generator),
            "text": text,
            "text_mask": mask,
            "caption": [r["caption"] for r in records],
            "metadata": [r["metadata"] for r in records],
            "index": torch.from_numpy(indices.astype(np.int64)),
        }
        if self.pooled_text != "none":
            batch["cond"] = self._pooled(indices, texts, drop)
        return batch


def pooled_source(cache: LatentCache, pooled_text: PooledText) -> PooledText:
    """The resolved source of the pooled vector: "cache" only if the cache stores one."""
    if pooled_text not in ("cache", "mean_tokens", "none"):
        raise ValueError(
            f"CachedLatentDataModule: pooled_text={pooled_text!r}; use 'cache' (the stored pooled "
            "vector, if any), 'mean_tokens' (the mean of the text tokens) or 'none'."
        )
    if pooled_text == "cache" and cache.pooled_dim is None:
        return "none"
    return pooled_text


def null_pooled(
    cache: LatentCache, pooled_text: PooledText, max_text_length: int | None
) -> np.ndarray | None:
    """The null caption's pooled vector [Dv] float32 for ``pooled_text`` (None for "none")."""
    if pooled_text == "mean_tokens":
        return mean_tokens([cache.null_text()[:max_text_length]], cache.text_dim)[0]
    return cache.null_pooled() if pooled_text == "cache" else None


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random (train, val) split of range(n); both sorted."""
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


class CachedLatentDataModule(pl.LightningDataModule):
    """Train/val loaders over a latent cache (built by ``cache_builder.build_cache``).

    ``text_dropout`` replaces a training sample's text by the null embedding (CFG training), and
    its pooled vector (``cond``, see ``pooled_text``) by the null caption's, in the same draw.
    ``expect_vae``/``expect_text`` are the configured encoders' fingerprints; a cache built
    with others is refused. ``verify``: see :class:`~fewstep.data.cache.LatentCache`. Under DDP,
    Lightning swaps in a DistributedSampler. Reading cached latents is cheap, so
    ``num_workers=0`` is often fastest (workers pay for sending each batch between processes).
    """

    dataset_class: type[CachedLatentDataset] = CachedLatentDataset  # subclasses add fields

    def __init__(
        self,
        path: str,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        val_path: str | None = None,
        text_dropout: float = 0.1,
        sample_posterior: bool = False,
        verify: Verify = "first",
        seed: int = 0,
        drop_last: bool = True,
        max_text_length: int | None = None,
        expect_vae: dict[str, str] | None = None,
        expect_text: dict[str, str] | None = None,
        pin_memory: bool = False,
        pooled_text: PooledText = "cache",
    ) -> None:
        super().__init__()
        _check_args(batch_size, num_workers, val_fraction, val_path, text_dropout, max_text_length)
        self.save_hyperparameters()
        self.path, self.val_path = path, val_path
        self.batch_size, self.num_workers, self.pin_memory = batch_size, num_workers, pin_memory
        self.val_fraction, self.text_dropout = val_fraction, text_dropout
        self.sample_posterior, self.verify, self.seed = sample_posterior, verify, seed
        self.drop_last, self.max_text_length = drop_last, max_text_length
        self.expect_vae, self.expect_text = expect_vae, expect_text
        self.pooled_text = pooled_text
        self._cache: LatentCache | None = None
        self.train_dataset: CachedLatentDataset | None = None
        self.val_dataset: CachedLatentDataset | None = None

    @property
    def cache(self) -> LatentCache:
        """The training cache, opened (and verified) on first use."""
        if self._cache is None:
            self._cache = LatentCache(self.path, self.verify, self.expect_vae, self.expect_text)
        return self._cache

    @property
    def scaling_factor(self) -> float:
        """VAE scaling factor the latents were normalised with."""
        return self.cache.scaling_factor

    @property
    def shift_factor(self) -> float:
        """VAE shift factor the latents were normalised with."""
        return self.cache.shift_factor

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of one latent."""
        return self.cache.latent_shape

    @property
    def text_dim(self) -> int:
        """Width D of the text embeddings."""
        return self.cache.text_dim

    @property
    def pooled_dim(self) -> int | None:
        """Width Dv of the batches' pooled vector ``cond``, or None if batches carry none."""
        source = pooled_source(self.cache, self.pooled_text)
        return {"none": None, "cache": self.cache.pooled_dim, "mean_tokens": self.text_dim}[source]

    def null_text(self) -> tuple[Tensor, ...]:
        """The null (empty-caption) embedding [1, L0, D] float32 and its mask [1, L0], plus its
        pooled vector [1, Dv] float32 when batches carry ``cond``."""
        text, mask = pad_texts([self.cache.null_text()[: self.max_text_length]], self.text_dim)
        pooled = null_pooled(
            self.cache, pooled_source(self.cache, self.pooled_text), self.max_text_length
        )
        return (text, mask) if pooled is None else (text, mask, torch.from_numpy(pooled)[None])

    def check_encoders(
        self, vae: dict[str, str] | None = None, text: dict[str, str] | None = None
    ) -> None:
        """Raise if the cache was built with encoders other than these fingerprints."""
        check_fingerprint(self.cache.root, self.cache.manifest, "vae", vae)
        check_fingerprint(self.cache.root, self.cache.manifest, "text_encoder", text)

    def setup(self, stage: str | None = None) -> None:
        """Open and verify the cache(s) and split train/val (idempotent)."""
        if self.train_dataset is not None:
            return
        cache, val_cache = self.cache, self._open_val_cache()
        train_idx, val_idx = split_indices(len(cache), self.val_fraction, self.seed)
        opts = {
            "max_text_length": self.max_text_length,
            "seed": self.seed,
            "pooled_text": self.pooled_text,
        }
        self.train_dataset = self.dataset_class(
            cache, train_idx, self.text_dropout, self.sample_posterior, **opts
        )
        if val_cache is not None:
            self.val_dataset = self.dataset_class(val_cache, **opts)
        elif len(val_idx):
            self.val_dataset = self.dataset_class(cache, val_idx, **opts)

    def _open_val_cache(self) -> LatentCache | None:
        """The separate validation cache, checked to match the training cache's encoders."""
        if self.val_path is None:
            return None
        fps = [self.cache.manifest[k]["fingerprint"] for k in ("vae", "text_encoder")]
        val = LatentCache(self.val_path, self.verify, *fps)
        mine = (self.latent_shape, self.text_dim, self.cache.pooled_dim)
        if (val.latent_shape, val.text_dim, val.pooled_dim) != mine:
            raise ValueError(
                f"val_path {self.val_path}: latents {val.latent_shape}, text dim {val.text_dim}, "
                f"pooled dim {val.pooled_dim}; {self.path} has {', '.join(map(str, mine))}"
            )
        return val

    def _loader(self, dataset: CachedLatentDataset, train: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler(dataset) if train else None,
            drop_last=self.drop_last and train,
            num_workers=self.num_workers,
            collate_fn=collate,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,  # workers keep open, verified shards
        )

    def _train_sampler(self, dataset: CachedLatentDataset) -> ResumableSampler:
        """Shuffled, rank-sharded, resuming mid-epoch exactly (ResumableSampler), with draw
        keys so text dropout and posterior noise follow (seed, epoch, sample)."""
        return resumable_sampler(
            dataset,
            self.batch_size,
            self.trainer,
            seed=self.seed,
            drop_last=self.drop_last,
            draw_keys=True,
        )

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move a batch's tensors, leaving its captions and metadata as they are: Lightning's
        default walks every caption and metadata dict, ~0.2 s for a batch of 1,024, which held a
        GPU teacher to 7 steps/s (docs/reference_teacher.md)."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {
            key: value if key in HOST_ONLY else move_data_to_device(value, device)
            for key, value in batch.items()
        }

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (CFG text dropout, optional posterior sampling)."""
        self.setup("fit")
        if self.drop_last and len(self.train_dataset) < self.batch_size:
            raise ValueError(
                f"CachedLatentDataModule: batch_size={self.batch_size} exceeds the "
                f"{len(self.train_dataset)} training samples of {self.path}; lower batch_size "
                "or set drop_last=False"
            )
        return self._loader(self.train_dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Validation batches in cache order (posterior mean, no dropout); [] if none."""
        self.setup("validate")
        return [] if self.val_dataset is None else self._loader(self.val_dataset, train=False)


def _check_args(
    batch_size: int,
    num_workers: int,
    val_fraction: float,
    val_path: str | None,
    text_dropout: float,
    max_text_length: int | None,
) -> None:
    """Reject bad CachedLatentDataModule arguments, naming the field."""
    problems = {
        "batch_size must be >= 1": batch_size < 1,
        "num_workers must be >= 0": num_workers < 0,
        "val_fraction must be in [0, 1)": not 0 <= val_fraction < 1,
        "give val_fraction or val_path, not both": val_fraction > 0 and val_path is not None,
        "text_dropout must be in [0, 1]": not 0 <= text_dropout <= 1,
        "max_text_length must be >= 1": max_text_length is not None and max_text_length < 1,
    }
    for message, bad in problems.items():
        if bad:
            raise ValueError(f"CachedLatentDataModule: {message}")
