"""Writing the latent cache (format in ``fewstep.data.cache``): the build folder and its lock,
shards written atomically (``<name>.tmp/`` then renamed) with sha256 and sizes, and the
manifest merged once every shard is complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fewstep.data.cache import (
    BUILD_CONFIG,
    BUILD_HINT,
    ENCODERS,
    FORMAT_VERSION,
    MANIFEST,
    NULL_TEXT,
    SHARD_FILES,
    SHARD_META,
    CacheError,
    combined_sha256,
    file_sha256,
    open_npy,
    read_json,
    shard_name,
)
from fewstep.utils.atomic import write_text_atomic


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
