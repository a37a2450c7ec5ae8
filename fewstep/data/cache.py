"""On-disk latent cache: sharded ``.npy`` files plus a manifest, written atomically, read by mmap.

Layout of a cache folder::

    build.json                 build config (format version, fingerprints, preprocessing, ...)
    null_text.npy              [L0, D] valid tokens of the null (empty-caption) embedding
    shard-00000/               samples [0, S); written as shard-00000.tmp/ then renamed
        latent_mean.npy        [N, C, h, w] posterior mean (raw latent space)
        latent_std.npy         [N, C, h, w] posterior std
        text.npy               [T, D] valid text tokens of all samples, concatenated
        text_offsets.npy       [N + 1] int64, sample i owns text[off[i]:off[i + 1]]
        records.jsonl          one {"caption", "metadata", "source_index"} line per sample
        <name>.npy             optional extra per-sample arrays [N, ...] (e.g. a coupling's noise)
        shard.json             sample/token counts and sha256 + size of every file above
    manifest.json              build config + latent shape, text dim and every shard's hashes

``manifest.json`` exists only once every shard is complete; readers refuse a folder without it.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_CONFIG = "build.json"
NULL_TEXT = "null_text.npy"
SHARD_META = "shard.json"
SHARD_FILES = ("latent_mean.npy", "latent_std.npy", "text.npy", "text_offsets.npy", "records.jsonl")
BUILD_HINT = "build it with `fewstep cache -c configs/cache/shapes.yaml` (see the README)"
Verify = Literal["first", "all", "none"]
ENCODERS = {"vae": "VAE", "text_encoder": "text encoder"}


class CacheError(RuntimeError):
    """A cache is missing, incomplete, corrupt or built with other encoders (message says which)."""


def shard_name(index: int) -> str:
    """Folder name of shard ``index``."""
    return f"shard-{index:05d}"


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def combined_sha256(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 for a shard, over its files' names and digests."""
    lines = "".join(f"{name}:{files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with an error naming the file if it is not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheError(f"{path}: unreadable ({e}); delete it and rerun the cache build") from e
    if not isinstance(data, dict):
        raise CacheError(f"{path}: expected a JSON object; delete it and rerun the cache build")
    return data


def open_npy(path: Path) -> np.ndarray:
    """Memory-map a ``.npy`` file (empty arrays, which cannot be mapped, are loaded)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.load(path, allow_pickle=False) if array.size == 0 else array


# ----------------------------------------------------------------------------- reading


def read_manifest(root: Path) -> dict[str, Any]:
    """Load and sanity-check ``manifest.json`` of the cache at ``root``."""
    path = root / MANIFEST
    if not path.exists():
        started = (root / BUILD_CONFIG).exists()
        why = "its build did not finish; rerun the build to complete it" if started else BUILD_HINT
        raise CacheError(f"No latent cache at {root}: {MANIFEST} is missing; {why}")
    manifest = read_json(path)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"{path}: cache format_version {version!r}, this fewstep reads "
            f"{FORMAT_VERSION}; rebuild the cache into a new folder"
        )
    return manifest


def check_fingerprint(
    root: Path, manifest: dict[str, Any], key: str, expected: dict[str, str] | None
) -> None:
    """Raise if the encoder ``key`` ("vae"/"text_encoder") differs from ``expected``."""
    found = manifest[key]["fingerprint"]
    if expected is not None and dict(expected) != found:
        label = ENCODERS[key]
        raise CacheError(
            f"Cache {root} was built with a different {label}: cache {label} fingerprint "
            f"{found}, configured {label} {dict(expected)}. Rebuild the cache with the "
            f"configured {label} (into a new folder), or configure the {label} it was built with."
        )


class _Shard:
    """Lazily memory-mapped arrays of one shard."""

    def __init__(self, folder: Path) -> None:
        self.mean = open_npy(folder / "latent_mean.npy")
        self.std = open_npy(folder / "latent_std.npy")
        self.text = open_npy(folder / "text.npy")
        self.offsets = np.load(folder / "text_offsets.npy")
        self.records = np.memmap(folder / "records.jsonl", dtype=np.uint8, mode="r")
        ends = np.flatnonzero(self.records == ord("\n")) + 1
        self.record_offsets = np.concatenate([[0], ends])
        self.folder = folder
        self.extra: dict[str, np.ndarray] = {}

    def array(self, name: str) -> np.ndarray:
        """The extra per-sample array ``<name>.npy``, memory-mapped on first use."""
        if name not in self.extra:
            self.extra[name] = open_npy(self.folder / f"{name}.npy")
        return self.extra[name]


class LatentCache:
    """Random access to a latent cache by memory-mapping; nothing is loaded into RAM up front.

    ``verify``: ``"all"`` checks every shard's sha256 now; ``"first"`` checks shard 0 now and
    every other shard the first time this process reads it; ``"none"`` only checks that every
    shard file exists with its recorded size.
    """

    def __init__(
        self,
        path: str | Path,
        verify: Verify = "first",
        expect_vae: dict[str, str] | None = None,
        expect_text: dict[str, str] | None = None,
        max_open_shards: int = 128,
    ) -> None:
        if verify not in ("first", "all", "none"):
            raise ValueError(f"verify={verify!r}: use 'first', 'all' or 'none'")
        self.root = Path(path)
        self.verify = verify
        self.manifest = read_manifest(self.root)
        check_fingerprint(self.root, self.manifest, "vae", expect_vae)
        check_fingerprint(self.root, self.manifest, "text_encoder", expect_text)
        shards = self.manifest["shards"]
        self.starts = np.cumsum([0] + [s["num_samples"] for s in shards])
        self.max_open_shards = max_open_shards
        self._open: OrderedDict[int, _Shard] = OrderedDict()
        self._verified: set[int] = set()
        self._check_files()
        self._null = self._load_null()
        for k in range(len(shards) if verify == "all" else int(verify == "first")):
            self.verify_shard(k)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_open": OrderedDict()}  # memmaps reopen in the new process

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """(C, h, w) of the stored latents."""
        return tuple(self.manifest["latent_shape"])

    @property
    def text_dim(self) -> int:
        """Width D of the stored text embeddings."""
        return int(self.manifest["text_dim"])

    @property
    def scaling_factor(self) -> float:
        """VAE latent scaling factor stored at build time."""
        return float(self.manifest["vae"]["scaling_factor"])

    @property
    def shift_factor(self) -> float:
        """VAE latent shift factor stored at build time."""
        return float(self.manifest["vae"]["shift_factor"])

    @property
    def pooled(self) -> dict[str, Any] | None:
        """The pooled text output's manifest entry {"array", "dim", "null"} (FLUX.1's CLIP
        vector), or None for a single-output text encoder's cache."""
        return self.manifest["text_encoder"].get("pooled")

    @property
    def pooled_dim(self) -> int | None:
        """Width Dv of the stored pooled text vectors, or None if the cache has none."""
        return None if self.pooled is None else int(self.pooled["dim"])

    def null_pooled(self) -> np.ndarray | None:
        """The pooled vector [Dv] float32 of the null (empty) caption, or None without one."""
        return None if self.pooled is None else np.asarray(self.pooled["null"], np.float32)

    def read_pooled(self, indices: Sequence[int]) -> np.ndarray:
        """Pooled text vectors [B, Dv] float32 of ``indices`` (the cache must store them)."""
        if self.pooled is None:
            raise CacheError(f"Cache {self.root} stores no pooled text vectors")
        return self.read_array(self.pooled["array"], indices).astype(np.float32)

    def _folder(self, k: int) -> Path:
        return self.root / self.manifest["shards"][k]["name"]

    def _check_files(self) -> None:
        """Every shard file exists with its recorded size (cheap: no hashing)."""
        for k, shard in enumerate(self.manifest["shards"]):
            for name, info in shard["files"].items():
                path = self._folder(k) / name
                if not path.is_file():
                    raise CacheError(
                        f"Cache {self.root}: shard {shard['name']} is missing ({path} not found). "
                        f"Rerun the cache build into {self.root}: it rebuilds only missing shards."
                    )
                if path.stat().st_size != info["bytes"]:
                    self._corrupt(
                        k, name, f"has {path.stat().st_size} bytes, expected {info['bytes']}"
                    )

    def _corrupt(self, k: int, name: str, why: str) -> None:
        folder = self._folder(k)
        raise CacheError(
            f"Cache {self.root}: shard {folder.name} is corrupt ({name} {why}). Delete {folder} "
            f"and rerun the cache build into {self.root}: it rebuilds only that shard."
        )

    def verify_shard(self, k: int) -> None:
        """Check the sha256 of every file of shard ``k`` against the manifest."""
        for name, info in self.manifest["shards"][k]["files"].items():
            digest = file_sha256(self._folder(k) / name)
            if digest != info["sha256"]:
                expected = info["sha256"]
                self._corrupt(k, name, f"sha256 {digest[:12]}..., manifest {expected[:12]}...")
        self._verified.add(k)

    def _load_null(self) -> np.ndarray:
        path = self.root / NULL_TEXT
        if not path.is_file() or file_sha256(path) != self.manifest["null_text"]["sha256"]:
            raise CacheError(
                f"Cache {self.root}: {NULL_TEXT} is missing or corrupt; delete "
                f"{self.root} and rebuild the cache"
            )
        return np.load(path)

    def null_text(self) -> np.ndarray:
        """Valid tokens [L0, D] of the null (empty-caption) text embedding."""
        return self._null

    def shard(self, k: int) -> _Shard:
        """Open (or reuse) shard ``k``; with verify="first" its hash is checked on first use."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        if self.verify == "first" and k not in self._verified:
            self.verify_shard(k)
        self._open[k] = _Shard(self._folder(k))
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[k]

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position in shard) of each cache index."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"cache index out of range [0, {len(self)}): {indices}")
        shards = np.searchsorted(self.starts, indices, side="right") - 1
        return shards, indices - self.starts[shards]

    def read_latents(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Posterior (mean, std) [B, C, h, w] in the stored dtype, in the order of ``indices``."""
        shards, local = self.locate(np.asarray(indices))
        dtype = np.dtype(self.manifest["dtype"])
        mean = np.empty((len(shards), *self.latent_shape), dtype)
        std = np.empty_like(mean)
        for k in np.unique(shards):
            rows = np.flatnonzero(shards == k)
            rows = rows[np.argsort(local[rows])]  # ascending reads within the memmap
            shard = self.shard(int(k))
            mean[rows] = shard.mean[local[rows]]
            std[rows] = shard.std[local[rows]]
        return mean, std

    def has_array(self, name: str) -> bool:
        """True if every shard stores the extra per-sample array ``<name>.npy``."""
        return all(f"{name}.npy" in shard["files"] for shard in self.manifest["shards"])

    def read_array(self, name: str, indices: Sequence[int]) -> np.ndarray:
        """Rows of the extra per-sample array ``<name>.npy`` [B, ...], in the order of indices."""
        if not self.has_array(name):
            raise CacheError(f"Cache {self.root} stores no per-sample array {name!r}")
        shards, local = self.locate(np.asarray(indices))
        first = self.shard(0).array(name)
        out = np.empty((len(shards), *first.shape[1:]), first.dtype)
        for k in np.unique(shards):
            rows = np.flatnonzero(shards == k)
            rows = rows[np.argsort(local[rows])]  # ascending reads within the memmap
            out[rows] = self.shard(int(k)).array(name)[local[rows]]
        return out

    def read_texts(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Valid text tokens [L_i, D] of each index (memory-mapped views, not copies)."""
        shards, local = self.locate(np.asarray(indices))
        out = []
        for k, i in zip(shards.tolist(), local.tolist(), strict=True):
            shard = self.shard(k)
            out.append(shard.text[shard.offsets[i] : shard.offsets[i + 1]])
        return out

    def read_records(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        """Stored {"caption", "metadata", "source_index"} of each index."""
        shards, local = self.locate(np.asarray(indices))
        out = []
        for k, i in zip(shards.tolist(), local.tolist(), strict=True):
            shard = self.shard(k)
            a, b = shard.record_offsets[i], shard.record_offsets[i + 1]
            out.append(json.loads(shard.records[a:b].tobytes()))
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        mean, std = self.read_latents([i])
        record = self.read_records([i])[0]
        return {
            "latent_mean": torch.from_numpy(mean[0]),
            "latent_std": torch.from_numpy(std[0]),
            "text": torch.from_numpy(np.array(self.read_texts([i])[0])),
            "caption": record["caption"],
            "metadata": record["metadata"],
            "index": int(i),
        }
