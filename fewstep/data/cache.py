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
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from fewstep.utils.atomic import write_text_atomic

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


def _fsync_write(path: Path, write: Any) -> None:
    """Open ``path`` for binary writing, call ``write(f)``, then flush and fsync."""
    with path.open("wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_npy(path: Path, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` durably."""
    _fsync_write(path, lambda f: np.save(f, np.ascontiguousarray(array), allow_pickle=False))


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` atomically (never half-written)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


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


# ----------------------------------------------------------------------------- writing


def start_cache(root: Path, config: dict[str, Any], null_text: np.ndarray) -> None:
    """Create or resume cache folder ``root`` for ``config``; refuse one built differently."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"format_version": FORMAT_VERSION, **config}
    existing = root / BUILD_CONFIG
    if existing.exists():
        _check_same_build(root, read_json(existing), config)
    elif any(not p.name.startswith(BUILD_CONFIG) and p.suffix != ".lock" for p in root.iterdir()):
        raise CacheError(
            f"{root} is not empty and holds no fewstep cache ({BUILD_CONFIG} missing); "
            "pick a new or empty out_dir"
        )
    else:
        write_json_atomic(existing, config)
    if not (root / NULL_TEXT).exists():
        tmp = root / f"{NULL_TEXT}.tmp{os.getpid()}.npy"
        save_npy(tmp, null_text)
        os.replace(tmp, root / NULL_TEXT)


def _check_same_build(root: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Raise if an existing cache's build config differs from the requested one."""
    for key, label in ENCODERS.items():
        old_fp = old.get(key, {}).get("fingerprint")
        new_fp = new[key]["fingerprint"]
        if old_fp != new_fp:
            raise CacheError(
                f"{root} already holds a cache built with a different {label}: "
                f"cache {label} fingerprint {old_fp}, this {label} {new_fp}. "
                f"Pick another out_dir, or delete {root} to rebuild it."
            )
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise CacheError(
                f"{root} already holds a cache built with {key}={old.get(key)!r}, "
                f"now {key}={new.get(key)!r}. Pick another out_dir, or delete {root} to rebuild it."
            )


def clean_tmp_shards(root: Path) -> None:
    """Remove leftover ``shard-*.tmp`` folders of an interrupted build."""
    for tmp in root.glob("shard-*.tmp"):
        shutil.rmtree(tmp)


def finished_shard(root: Path, index: int, num_source: int) -> bool:
    """True if shard ``index`` was completely written from ``num_source`` dataset samples and
    every file its shard.json records exists with the recorded size."""
    folder = root / shard_name(index)
    try:
        meta = json.loads((folder / SHARD_META).read_text())
        if meta.get("num_source", meta["num_samples"]) != num_source:
            return False
        return all(
            (folder / name).is_file() and (folder / name).stat().st_size == info["bytes"]
            for name, info in meta["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _json_default(value: Any) -> Any:
    """JSON form of numpy scalars/arrays found in metadata."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _records_bytes(records: Sequence[dict[str, Any]]) -> bytes:
    """One sorted-key JSON line per record (newlines inside strings are escaped)."""
    lines = []
    for r in records:
        try:
            lines.append(json.dumps(r, sort_keys=True, ensure_ascii=False, default=_json_default))
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"dataset sample {r.get('source_index')}: caption/metadata cannot be stored as "
                f"JSON ({e}); make the dataset's metadata JSON-serialisable"
            ) from e
    return "".join(line + "\n" for line in lines).encode("utf-8")


def write_shard(
    root: Path,
    index: int,
    mean: np.ndarray,
    std: np.ndarray,
    texts: Sequence[np.ndarray],
    records: Sequence[dict[str, Any]],
    extra: dict[str, np.ndarray] | None = None,
    skipped: Sequence[dict[str, Any]] = (),
    truncated_captions: int = 0,
) -> dict[str, Any]:
    """Write one shard atomically (into ``<name>.tmp/``, then rename); return its shard.json.
    ``extra`` maps names to further per-sample arrays [N, ...], stored as ``<name>.npy``;
    ``skipped`` lists the dataset samples of this shard that could not be read (index, reason);
    ``truncated_captions`` counts its captions cut at the text encoder's max_length."""
    n, extra = len(mean), extra or {}
    if not n == len(std) == len(texts) == len(records):
        raise ValueError(
            f"shard {index}: {n} means, {len(std)} stds, {len(texts)} texts, {len(records)} records"
        )
    for key, array in extra.items():
        if len(array) != n or f"{key}.npy" in SHARD_FILES or not key.isidentifier():
            raise ValueError(f"shard {index}: extra array {key!r} ({len(array)} rows) for {n}")
    if n == 0:
        raise ValueError(
            f"shard {index}: every sample was unreadable ({list(skipped)[:3]} ...); fix or remove "
            "those files, then rerun the build"
        )
    name = shard_name(index)
    tmp, final = root / f"{name}.tmp", root / name
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    lengths = np.array([len(t) for t in texts], dtype=np.int64)
    dim = texts[0].shape[1]
    text = np.concatenate(texts) if lengths.sum() else np.zeros((0, dim), texts[0].dtype)
    save_npy(tmp / "latent_mean.npy", mean)
    save_npy(tmp / "latent_std.npy", std)
    save_npy(tmp / "text.npy", text)
    save_npy(tmp / "text_offsets.npy", np.concatenate([[0], np.cumsum(lengths)]))
    _fsync_write(tmp / "records.jsonl", lambda f: f.write(_records_bytes(records)))
    for key, array in extra.items():
        save_npy(tmp / f"{key}.npy", array)
    names = [*SHARD_FILES, *(f"{key}.npy" for key in extra)]
    files = {f: {"bytes": (tmp / f).stat().st_size, "sha256": file_sha256(tmp / f)} for f in names}
    meta = {
        "name": name,
        "num_samples": n,
        "num_source": n + len(skipped),
        "skipped": list(skipped),
        "truncated_captions": truncated_captions,
        "num_tokens": int(lengths.sum()),
        "files": files,
        "sha256": combined_sha256(files),
    }
    write_json_atomic(tmp / SHARD_META, meta)
    if final.exists():  # an invalid shard (the builder never rewrites finished ones)
        shutil.rmtree(final)
    os.rename(tmp, final)
    return meta


def missing_shards(root: Path, num_samples: int, shard_size: int) -> list[str]:
    """Names of the shards of a ``num_samples`` cache that are not finished yet."""
    count = -(-num_samples // shard_size)
    sizes = [min(shard_size, num_samples - k * shard_size) for k in range(count)]
    return [shard_name(k) for k, n in enumerate(sizes) if not finished_shard(root, k, n)]


def merge_manifest(root: Path) -> dict[str, Any]:
    """Write ``manifest.json`` from ``build.json`` and every shard's ``shard.json``."""
    root = Path(root)
    if not (root / BUILD_CONFIG).exists():
        raise CacheError(
            f"{root}: {BUILD_CONFIG} missing, so no cache build started here; {BUILD_HINT}"
        )
    config = read_json(root / BUILD_CONFIG)
    missing = missing_shards(root, config["num_samples"], config["shard_size"])
    if missing:
        raise CacheError(
            f"{root}: cannot write the manifest, shards not finished: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}; "
            "rerun the cache build (on every rank) to finish them"
        )
    count = -(-config["num_samples"] // config["shard_size"])
    shards = [read_json(root / shard_name(k) / SHARD_META) for k in range(count)]
    first = root / shard_name(0)
    null = np.load(root / NULL_TEXT)
    manifest = {
        **config,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_source": config["num_samples"],
        "skipped": [item for s in shards for item in s.get("skipped", [])],
        "truncated_captions": sum(s.get("truncated_captions", 0) for s in shards),
        "latent_shape": list(open_npy(first / "latent_mean.npy").shape[1:]),
        "text_dim": int(null.shape[1]),
        "null_text": {"num_tokens": int(null.shape[0]), "sha256": file_sha256(root / NULL_TEXT)},
        "shards": shards,
    }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


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


@contextmanager
def resumable_build(where: Callable[[], str], bar: Any, lock: Path) -> Iterator[None]:
    """Hold the build ``lock`` (a second concurrent build into the folder fails at once); close
    the progress ``bar`` on exit; on an error, note that finished shards are kept and that
    rerunning the same build resumes (``where()`` names the build and where it stopped)."""
    with build_lock(lock):
        try:
            yield
        except Exception as e:
            if hasattr(e, "add_note"):  # Python >= 3.11
                e.add_note(
                    f"{where()} stopped; finished shards are kept. Rerun the same build to resume."
                )
            raise
        finally:
            bar.close()


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """Exclusive-create ``path`` (holding this pid) for the block; a lock held by a live process
    is a CacheError naming it, one left by a dead process on this host is taken over."""
    owner = f"{os.getpid()} {os.uname().nodename}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            pid, _, host = path.read_text().partition(" ")
            if host.strip() == os.uname().nodename and pid.isdigit() and not _alive(int(pid)):
                path.unlink(missing_ok=True)  # stale: its build died
                continue
            raise CacheError(
                f"Another build (process {pid} on {host.strip() or '?'}) is writing into "
                f"{path.parent}; wait for it to finish, or delete {path} if it is no longer "
                "running."
            ) from None
    else:
        raise CacheError(f"Could not take the build lock {path}; delete it and rerun.")
    with os.fdopen(fd, "w") as f:
        f.write(owner)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
