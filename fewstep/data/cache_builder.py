"""Build a latent cache (see :mod:`fewstep.data.cache`) from an image–caption dataset.

Latents are stored as the VAE posterior mean and std, text embeddings as their valid tokens
only. A text encoder with a second, pooled output (``pooled(captions) -> [B, Dv]``, FLUX.1's CLIP
vector) also gets a per-sample ``pooled_text.npy`` in each shard and its null vector in the build
config; caches of single-output encoders are written exactly as before.

Shard k holds dataset indices [k*S, (k+1)*S); under DDP rank r writes the shards with
k % world_size == r and rank 0 merges the manifest. Rerunning skips finished shards.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fewstep.data import cache, cache_write

DTYPES = ("float16", "float32")
POOLED = "pooled_text"  # per-sample extra array of a text encoder's pooled output [N, Dv]


class ImageEncoder(Protocol):
    """What the builder needs of a VAE."""

    scaling_factor: float | Tensor
    shift_factor: float | Tensor

    def encode_moments(self, images: Tensor) -> tuple[Tensor, Tensor]: ...

    def fingerprint(self) -> dict[str, str]: ...


class TextEncoder(Protocol):
    """What the builder needs of a text encoder (optionally also ``pooled(captions)`` [B, Dv]
    and ``null_pooled()`` [1, Dv], as FluxTextEncoder has)."""

    def __call__(self, captions: list[str]) -> tuple[Tensor, Tensor]: ...

    def null_embedding(self) -> tuple[Tensor, Tensor]: ...

    def fingerprint(self) -> dict[str, str]: ...


def _scalar(x: Any) -> float:
    """A float from a float, a 0-d tensor or None (-> 0)."""
    return 0.0 if x is None else float(x)


_SKIP = object()
RUNTIME_STATE = {"skipped", "skipped_reasons"}  # what a dataset learns while read, not its recipe


def _describe(value: Any) -> Any:
    """JSON form of a simple attribute value (scalar, path, short list or 1-D array of them),
    else _SKIP."""
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 1:  # e.g. ShapesWorld.category_probs
        return _describe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple) and len(value) <= 32:
        items = [_describe(v) for v in value]
        return _SKIP if _SKIP in items else items
    return _SKIP


def describe_dataset(dataset: Any) -> dict[str, Any]:
    """Class name and simple public attributes of a dataset (how it was generated/read)."""
    out: dict[str, Any] = {"class": f"{type(dataset).__module__}.{type(dataset).__qualname__}"}
    for key, value in sorted(getattr(dataset, "__dict__", {}).items()):
        described = _describe(value)
        if not key.startswith("_") and key not in RUNTIME_STATE and described is not _SKIP:
            out[key] = described
    return out


def _first_image(dataset: Any) -> Tensor:
    """The first readable image of ``dataset``."""
    for i in range(len(dataset)):
        sample = dataset[i]
        if "skipped" not in sample:
            return sample["image"]
    raise ValueError(f"build_cache: no readable image in the dataset ({describe_dataset(dataset)})")


def build_config(
    dataset: Any, vae: ImageEncoder, text_encoder: TextEncoder, shard_size: int, dtype: str
) -> dict[str, Any]:
    """The build config stored in ``build.json`` and the manifest."""
    height, width = _first_image(dataset).shape[-2:]
    center_crop = getattr(dataset, "center_crop", None)
    crop = "none" if center_crop is None else ("center" if center_crop else "resize")
    return {
        "num_samples": len(dataset),
        "shard_size": shard_size,
        "dtype": dtype,
        "vae": {
            "fingerprint": dict(vae.fingerprint()),
            "scaling_factor": _scalar(vae.scaling_factor),
            "shift_factor": _scalar(getattr(vae, "shift_factor", None)),
        },
        "text_encoder": text_encoder_config(text_encoder, dtype),
        "preprocessing": {
            "resolution": int(height) if height == width else [int(height), int(width)],
            "crop": crop,
            "dataset": describe_dataset(dataset),
        },
    }


def has_pooled(text_encoder: Any) -> bool:
    """Whether the text encoder has a pooled output to cache (e.g. FLUX.1's CLIP vector)."""
    return callable(getattr(text_encoder, "pooled", None))


def text_encoder_config(text_encoder: TextEncoder, dtype: str) -> dict[str, Any]:
    """The text encoder's build-config entry: its fingerprint (for two encoders, both: e.g.
    t5_* and clip_*), plus the pooled output's array name, width and null vector if it has one."""
    entry: dict[str, Any] = {"fingerprint": dict(text_encoder.fingerprint())}
    if has_pooled(text_encoder):
        with torch.inference_mode():
            null = _to_numpy(text_encoder.null_pooled(), dtype, "null pooled text")[0]
        entry["pooled"] = {"array": POOLED, "dim": int(null.shape[0]), "null": null.tolist()}
    return entry


def _to_numpy(x: Tensor, dtype: str, what: str) -> np.ndarray:
    """Cast to the storage dtype; refuse non-finite values (or float16 overflow)."""
    array = x.detach().float().cpu().numpy()
    with np.errstate(over="ignore"):
        stored = array.astype(dtype)
    if not np.isfinite(stored).all():
        hint = "; rebuild with dtype='float32'" if np.isfinite(array).all() else ""
        raise ValueError(f"{what} has values that are not finite in {dtype}{hint}")
    return stored


def valid_tokens(emb: Tensor, mask: Tensor, dtype: str, what: str) -> list[np.ndarray]:
    """Per sample, the [L_i, D] rows of ``emb`` where ``mask`` is true."""
    if emb.ndim != 3 or mask.shape != emb.shape[:2]:
        raise ValueError(
            f"{what}: expected emb [B,L,D] and mask [B,L], got "
            f"{tuple(emb.shape)} and {tuple(mask.shape)}"
        )
    stored = _to_numpy(emb, dtype, what)
    keep = mask.bool().cpu().numpy()
    return [stored[b][keep[b]] for b in range(len(stored))]


def _device(module: Any) -> torch.device:
    """Device of a module's first parameter (CPU for anything else)."""
    params = module.parameters() if isinstance(module, torch.nn.Module) else iter(())
    return next(params, torch.zeros(())).device


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images; keep captions, metadata and indices as lists; list unreadable samples
    (dropped, never substituted) under ``skipped`` as {"index", "reason"}."""
    kept = [s for s in samples if "skipped" not in s]
    return {
        "image": torch.stack([s["image"] for s in kept]) if kept else None,
        "caption": [s["caption"] for s in kept],
        "metadata": [s["metadata"] for s in kept],
        "index": [int(s["index"]) for s in kept],
        "skipped": [
            {"index": int(s["index"]), "reason": s["skipped"]} for s in samples if "skipped" in s
        ],
    }


def encode_batch(
    batch: dict[str, Any], vae: ImageEncoder, text_encoder: TextEncoder, dtype: str
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray], list[dict[str, Any]], dict[str, np.ndarray]]:
    """(mean, std, valid text tokens, records, extra per-sample arrays) of one dataset batch."""
    extra: dict[str, np.ndarray] = {}
    with torch.inference_mode():
        mean, std = vae.encode_moments(batch["image"].to(_device(vae)))
        emb, mask = text_encoder(batch["caption"])
        if has_pooled(text_encoder):
            extra[POOLED] = _to_numpy(text_encoder.pooled(batch["caption"]), dtype, "pooled text")
    n = len(batch["caption"])
    if any(len(array) != n for array in extra.values()):
        raise ValueError(f"the text encoder's pooled output has {len(extra[POOLED])} rows for {n}")
    if mean.shape != std.shape or len(mean) != n or len(emb) != n:
        raise ValueError(
            f"encoders returned mean {tuple(mean.shape)}, std {tuple(std.shape)}, "
            f"text {tuple(emb.shape)} for a batch of {n}"
        )
    records = [
        {"caption": c, "metadata": m, "source_index": i}
        for c, m, i in zip(batch["caption"], batch["metadata"], batch["index"], strict=True)
    ]
    return (
        _to_numpy(mean, dtype, "VAE posterior mean"),
        _to_numpy(std, dtype, "VAE posterior std"),
        valid_tokens(emb, mask, dtype, "text embedding"),
        records,
        extra,
    )


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit rank/world size, else torch.distributed's, else (0, 1)."""
    if rank is not None or world_size is not None:
        rank, world_size = rank or 0, world_size or 1
    elif _distributed():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    return rank, world_size


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def build_cache(
    dataset: Dataset,
    vae: ImageEncoder,
    text_encoder: TextEncoder,
    out_dir: str | Path,
    shard_size: int = 1024,
    batch_size: int = 64,
    dtype: str = "float16",
    num_workers: int = 0,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> Path:
    """Encode ``dataset`` into a latent cache at ``out_dir``; resumes an interrupted build."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {DTYPES}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    if len(dataset) == 0:
        raise ValueError("build_cache: the dataset is empty")
    root, (rank, world_size) = Path(out_dir), _rank_world(rank, world_size)
    config = build_config(dataset, vae, text_encoder, shard_size, dtype)
    null = valid_tokens(*text_encoder.null_embedding(), dtype, "null text embedding")[0]
    if rank == 0:
        cache_write.start_cache(root, config, null)
    _barrier()
    if rank != 0:
        cache_write.start_cache(root, config, null)  # checks the build config rank 0 wrote
    _write_shards(
        dataset,
        vae,
        text_encoder,
        root,
        config,
        rank,
        world_size,
        batch_size,
        num_workers,
        progress,
    )
    _barrier()
    if rank == 0 or not _distributed():
        if not cache_write.missing_shards(root, len(dataset), shard_size):
            cache_write.merge_manifest(root)
            cache_write.clean_tmp_shards(root)
    _barrier()
    return root


def _write_shards(
    dataset: Dataset,
    vae: ImageEncoder,
    text_encoder: TextEncoder,
    root: Path,
    config: dict[str, Any],
    rank: int,
    world_size: int,
    batch_size: int,
    num_workers: int,
    progress: bool,
) -> None:
    """Encode and write this rank's unfinished shards."""
    n, size = config["num_samples"], config["shard_size"]
    mine = range(rank, -(-n // size), world_size)
    todo = [k for k in mine if not cache_write.finished_shard(root, k, min(size, n - k * size))]
    batches, owner = [], []
    for k in todo:
        for start in range(k * size, min((k + 1) * size, n), batch_size):
            batches.append(list(range(start, min(start + batch_size, (k + 1) * size, n))))
            owner.append(k)
    total = sum(min(size, n - k * size) for k in mine)
    bar = tqdm(
        total=total,
        initial=total - sum(map(len, batches)),
        unit="img",
        desc=f"caching latents (rank {rank})",
        disable=not progress or rank != 0,
    )
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=_collate
    )
    parts: list[tuple[Any, ...]] = []
    shard = todo[0] if todo else -1

    def where() -> str:  # read when a build stops: names the shard it stopped in
        return f"Cache build into {root} ({cache.shard_name(shard)})"

    skipped: list[dict[str, Any]] = []
    truncated = getattr(text_encoder, "truncated", 0)
    with cache_write.resumable_build(where, bar, root / f"build-rank{rank}.lock"):
        for i, batch in enumerate(loader):
            shard = owner[i]
            skipped += batch["skipped"]
            if batch["caption"]:
                parts.append(encode_batch(batch, vae, text_encoder, config["dtype"]))
            bar.update(len(batch["caption"]) + len(batch["skipped"]))
            if i + 1 == len(batches) or owner[i + 1] != shard:
                cut = getattr(text_encoder, "truncated", 0) - truncated
                _write(root, shard, parts, skipped, cut)
                parts, skipped, truncated = [], [], truncated + cut


def _write(
    root: Path,
    shard: int,
    parts: list[tuple[Any, ...]],
    skipped: list[dict[str, Any]],
    truncated_captions: int,
) -> None:
    """Write one shard from its encoded batches, naming the samples that were unreadable."""
    for item in skipped:
        warnings.warn(
            f"cache: skipped unreadable sample {item['index']} ({item['reason']})", stacklevel=2
        )
    mean, std, texts, records, extras = zip(*parts, strict=True) if parts else ([], [], [], [], [])
    extra = {key: np.concatenate([e[key] for e in extras]) for key in (extras[0] if parts else {})}
    cache_write.write_shard(
        root,
        shard,
        np.concatenate(mean) if parts else np.zeros((0,)),
        np.concatenate(std) if parts else np.zeros((0,)),
        [t for ts in texts for t in ts],
        [r for rs in records for r in rs],
        extra=extra,
        skipped=skipped,
        truncated_captions=truncated_captions,
    )
