"""Image-folder dataset with captions (Hugging Face ``metadata.jsonl`` or ``.txt`` sidecars).

Reading: :class:`ImageCaptionFolder` resizes the shortest side to ``resolution`` and centre-crops.
Unreadable or truncated images are skipped — their sample is dropped, never replaced by another
image — with a warning, and listed with the reason in :meth:`summary` and ``skipped_reasons``.
Writing: :func:`write_image_folder` writes samples out in the same format.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
METADATA_FILE = "metadata.jsonl"
# Errors PIL raises for corrupt, truncated or unidentifiable files.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SUMMARY_MAX_NAMES = 10


class UnreadableImageWarning(UserWarning):
    """Warning emitted when an image cannot be decoded and is skipped."""


@dataclass(frozen=True)
class ImageEntry:
    """One indexed image: its path, caption and extra metadata."""

    path: Path
    caption: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _is_image(path: Path) -> bool:
    """Return True if ``path`` is a file with a supported image extension."""
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _parse_metadata_line(line: str, meta_path: Path, lineno: int) -> tuple[str, str, dict]:
    """Parse one ``metadata.jsonl`` line into ``(file_name, text, extra)``."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}, line {lineno}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict):
        raise ValueError(f"{meta_path}, line {lineno}: expected a JSON object")
    missing = [k for k in ("file_name", "text") if k not in record]
    if missing:
        raise ValueError(f"{meta_path}, line {lineno}: missing key(s) {missing}")
    file_name, text = record.pop("file_name"), record.pop("text")
    if not isinstance(file_name, str) or not isinstance(text, str):
        raise ValueError(f"{meta_path}, line {lineno}: 'file_name' and 'text' must be strings")
    return file_name, text, record


def _entries_from_metadata(root: Path) -> list[ImageEntry]:
    """Index images listed in ``root/metadata.jsonl``."""
    meta_path = root / METADATA_FILE
    entries = []
    with meta_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            file_name, text, extra = _parse_metadata_line(line, meta_path, lineno)
            path = root / file_name
            if not path.resolve().is_relative_to(root.resolve()):
                raise ValueError(
                    f"{meta_path}, line {lineno}: file_name {file_name!r} points outside the "
                    f"folder {root}; list files inside it (relative paths without '..')"
                )
            if not path.is_file():
                raise FileNotFoundError(
                    f"{meta_path}, line {lineno}: file_name {file_name!r} does not exist ({path})"
                )
            entries.append(ImageEntry(path, text, extra))
    if not entries:
        raise ValueError(f"{meta_path} lists no images; the folder {root} has nothing to load")
    return entries


def _entries_from_sidecars(root: Path) -> list[ImageEntry]:
    """Index every image under ``root`` with the caption from its sibling ``.txt``."""
    images = sorted(p for p in root.rglob("*") if _is_image(p))
    if not images:
        exts = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise FileNotFoundError(f"No images ({exts}) found in {root}")
    entries = []
    for path in images:
        txt = path.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(
                f"No caption for image {path}: add {txt.name} beside it, "
                f"or a {METADATA_FILE} in {root} with 'file_name' and 'text'"
            )
        entries.append(ImageEntry(path, txt.read_text(encoding="utf-8").strip()))
    return entries


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    """16-bit/32-bit integer or float greyscale ("I;16*", "I", "F") -> 8-bit "L" by its range
    (PIL's own convert("RGB") clips these to white)."""
    array = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
    if im.mode == "F":
        top = 1.0 if array.max(initial=0) <= 1.0 else 255.0
    return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")


def load_rgb(path: Path) -> Image.Image:
    """Fully decode an image file and return it as RGB (raises on corrupt/truncated files)."""
    with Image.open(path) as im:
        im.load()
        if im.mode.startswith("I") or im.mode == "F":
            return _high_bit_depth_to_l(im).convert("RGB")
        if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
            im = im.convert("RGBA")
            background = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, im).convert("RGB")
        return im.convert("RGB")


def resize_and_crop(image: Image.Image, resolution: int, center_crop: bool = True) -> Image.Image:
    """Resize the shortest side to ``resolution`` and centre-crop (or plain-resize) to square."""
    if not center_crop:
        return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
    w, h = image.size
    scale = resolution / min(w, h)
    new_w, new_h = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """Convert an RGB PIL image to a float tensor ``[3, H, W]`` in ``[-1, 1]``."""
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


class ImageCaptionFolder(Dataset):
    """Folder of captioned images (``metadata.jsonl`` or ``.txt`` sidecars), square-cropped.

    An unreadable image gives ``{"skipped": reason, "index": i}`` instead of a sample (the
    collate functions drop it; nothing is substituted) and is recorded in ``skipped`` and
    ``skipped_reasons``. With DataLoader workers each worker keeps its own records, so call
    :meth:`check` up front to find (and drop) every bad file in the main process.
    """

    def __init__(self, root: str | Path, resolution: int = 64, center_crop: bool = True) -> None:
        """Index ``root``; raises if it is missing, empty, or an image has no caption."""
        self.root = Path(root)
        if not self.root.exists():
            raise FileNotFoundError(f"Image folder {self.root} does not exist")
        if not self.root.is_dir():
            raise NotADirectoryError(f"Image folder {self.root} is not a directory")
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive int, got {resolution!r}")
        self.resolution = resolution
        self.center_crop = center_crop
        if (self.root / METADATA_FILE).is_file():
            self.entries = _entries_from_metadata(self.root)
        else:
            self.entries = _entries_from_sidecars(self.root)
        self.num_found = len(self.entries)
        self.skipped: list[Path] = []
        self.skipped_reasons: dict[Path, str] = {}

    def __len__(self) -> int:
        """Number of indexed images (bad ones removed by :meth:`check` are excluded)."""
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``{"image", "caption", "metadata", "index"}``, or ``{"skipped": reason, "index"}``
        for an unreadable image (warned about once)."""
        n = len(self.entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} images")
        index %= n
        entry = self.entries[index]
        image = None if entry.path in self.skipped_reasons else self._load(entry.path)
        if image is None:
            reason = f"{self._display_name(entry.path)}: {self.skipped_reasons[entry.path]}"
            return {"skipped": reason, "index": index}
        return self._sample(index, entry, image)

    def _sample(self, i: int, entry: ImageEntry, image: Image.Image) -> dict[str, Any]:
        """Build the sample dict for an already decoded image."""
        image = resize_and_crop(image, self.resolution, self.center_crop)
        return {
            "image": pil_to_tensor(image),
            "caption": entry.caption,
            "metadata": dict(entry.metadata),
            "index": i,
        }

    def _load(self, path: Path) -> Image.Image | None:
        """Decode ``path`` as RGB; on failure warn, record it in ``skipped`` and return None."""
        try:
            return load_rgb(path)
        except _DECODE_ERRORS as e:
            self._mark_bad(path, e)
            return None

    def _mark_bad(self, path: Path, error: BaseException) -> None:
        """Warn about an unreadable image and record it once in ``skipped``."""
        if path not in self.skipped:
            self.skipped.append(path)
        self.skipped_reasons[path] = f"{type(error).__name__}: {error}"
        warnings.warn(
            f"Skipping unreadable image {path}: {type(error).__name__}: {error}",
            UnreadableImageWarning,
            stacklevel=4,
        )

    def check(self, progress: bool = True) -> list[Path]:
        """Decode every image once, record bad ones in ``skipped``, drop them; return them."""
        bad = []
        for entry in tqdm(self.entries, desc="Checking images", disable=not progress):
            if entry.path in self.skipped_reasons or self._load(entry.path) is None:
                bad.append(entry.path)
        bad_set = set(bad)
        self.entries = [e for e in self.entries if e.path not in bad_set]
        return bad

    def summary(self) -> str:
        """One-line summary: images found and which were skipped as unreadable."""
        text = f"{self.num_found} images, {len(self.skipped)} skipped (unreadable)"
        if not self.skipped:
            return text
        names = [
            f"{self._display_name(p)} ({self.skipped_reasons.get(p, 'unreadable')})"
            for p in self.skipped[:_SUMMARY_MAX_NAMES]
        ]
        more = len(self.skipped) - len(names)
        return f"{text}: {', '.join(names)}" + (f", ... and {more} more" if more else "")

    def _display_name(self, path: Path) -> str:
        """Path relative to the root when possible, for readable messages."""
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)


def split_skipped(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(readable samples, reasons of the unreadable ones) of a list from a dataset."""
    kept = [s for s in samples if "skipped" not in s]
    return kept, [s["skipped"] for s in samples if "skipped" in s]


def _to_pil(image: Any) -> Image.Image:
    """Convert a float tensor in [-1, 1], a uint8 HxWx3 array, or a PIL image to RGB PIL."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be [3, H, W], got {tuple(image.shape)}")
        scaled = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round()
        image = scaled.to(torch.uint8).permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image array must be uint8 HxWx3, got {image.dtype} {image.shape}")
        return Image.fromarray(image)
    raise TypeError(f"Unsupported image type {type(image).__name__}")


def _metadata_line(file_name: str, sample: dict, index: int) -> str:
    """Serialise one ``metadata.jsonl`` record for ``sample``."""
    if "caption" not in sample or "image" not in sample:
        raise KeyError(f"sample {index} needs 'image' and 'caption' keys, has {list(sample)}")
    extra = dict(sample.get("metadata") or {})
    clash = {"file_name", "text"} & extra.keys()
    if clash:
        raise ValueError(f"sample {index}: metadata may not use reserved key(s) {sorted(clash)}")
    try:
        return json.dumps({"file_name": file_name, "text": str(sample["caption"]), **extra})
    except TypeError as e:
        raise TypeError(f"sample {index}: metadata is not JSON-serialisable ({e})") from e


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create ``out_dir``, refusing a non-empty one unless ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"Output path {out_dir} exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"Output folder {out_dir} is not empty; pass overwrite=True or choose another folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def write_image_folder(
    samples: Iterable[dict],
    out_dir: str | Path,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write samples as ``00000000.png``... plus an atomically written ``metadata.jsonl``."""
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    meta_path = out_dir / METADATA_FILE
    tmp_path = out_dir / f".{METADATA_FILE}.tmp"
    count = 0
    try:
        with tmp_path.open("w", encoding="utf-8") as f:
            bar = tqdm(samples, desc="Writing images", disable=not progress)
            for index, sample in enumerate(bar):
                file_name = f"{index:08d}.png"
                line = _metadata_line(file_name, sample, index)
                _to_pil(sample["image"]).save(out_dir / file_name)
                f.write(line + "\n")
                count += 1
            if count == 0:
                raise ValueError(f"No samples to write to {out_dir}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, meta_path)
    finally:
        tmp_path.unlink(missing_ok=True)
    return out_dir
