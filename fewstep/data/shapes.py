"""The shapes world: a seeded, procedural text-to-image dataset covering GenEval's six
categories (Ghosh et al. 2023) — single object, two objects, counting, colours, position
and colour attribution — rendered with anti-aliasing on achromatic backgrounds."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from fewstep.data.prompts import (
    CATEGORIES,
    COLORS,
    RELATIONS,
    SHAPES,
    Spec,
    caption_of,
    make_spec,
    obj,
)

SUPERSAMPLE = 4
BACKGROUNDS = ("plain", "gradient", "texture")
INFINITE = sys.maxsize


@dataclass(frozen=True)
class Placed:
    """One rendered object: shape, colour name, centre (x, y) and side, in image fractions."""

    shape: str
    color: str
    x: float
    y: float
    size: float


class ShapesWorld(Dataset):
    """Map-style dataset: index -> {"image": [3,R,R] in [-1,1], "caption", "metadata"}.

    The same (seed, index) always gives the same sample. ``size=None`` makes it
    effectively infinite (index it, or iterate sequentially).
    """

    def __init__(
        self,
        size: int | None = 10_000,
        resolution: int = 64,
        seed: int = 0,
        categories: dict[str, float] | None = None,
        object_size: tuple[float, float] = (0.2, 0.3),
        background: str = "plain",
        background_gray: tuple[float, float] = (0.3, 0.7),
        gap: float = 0.06,
    ) -> None:
        if not 32 <= resolution <= 256:
            raise ValueError(f"ShapesWorld.resolution={resolution}: must be in [32, 256]")
        if background not in BACKGROUNDS:
            raise ValueError(f"ShapesWorld.background={background!r}: use one of {BACKGROUNDS}")
        lo, hi = object_size
        if not 0.05 <= lo <= hi <= 0.45:
            raise ValueError(
                f"ShapesWorld.object_size={object_size}: need 0.05 <= min <= max <= 0.45"
            )
        self.size = INFINITE if size is None else int(size)
        self.resolution = resolution
        self.seed = seed
        self.category_names, self.category_probs = _category_weights(categories)
        self.object_size = (float(lo), float(hi))
        self.background = background
        self.background_gray = background_gray
        self.gap = gap

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ShapesWorld of size {self.size}")
        image, spec, placed = self.render(index)
        chw = torch.from_numpy(image).permute(2, 0, 1).float() * 2 - 1  # HWC[0,1] -> CHW[-1,1]
        return {
            "image": chw,
            "caption": caption_of(spec),
            "metadata": {"spec": spec, "objects": [p.__dict__ for p in placed]},
            "index": index,
        }

    def render(self, index: int) -> tuple[np.ndarray, Spec, list[Placed]]:
        """Render sample ``index`` as an HxWx3 float32 array in [0, 1], with its spec."""
        rng = np.random.default_rng([self.seed, index])
        category = self.category_names[rng.choice(len(self.category_names), p=self.category_probs)]
        spec = sample_spec(category, rng)
        placed = self._layout(spec, rng)
        image = self._background(rng)
        for p in placed:
            alpha = coverage(p, self.resolution)[..., None]
            image = image * (1 - alpha) + np.asarray(COLORS[p.color], np.float32) * alpha
        return image.astype(np.float32), spec, placed

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        r = self.resolution
        level = rng.uniform(*self.background_gray)
        gray = np.full((r, r), level, np.float32)
        if self.background == "gradient":
            ramp = np.linspace(-0.1, 0.1, r, dtype=np.float32)
            gray = gray + (ramp[:, None] if rng.random() < 0.5 else ramp[None, :])
        elif self.background == "texture":
            coarse = rng.normal(0, 0.05, (5, 5)).astype(np.float32)
            gray = gray + np.kron(coarse, np.ones((r // 4 + 1, r // 4 + 1)))[:r, :r]
        return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2)

    def _layout(self, spec: Spec, rng: np.random.Generator) -> list[Placed]:
        """Place objects without overlap; satisfy the spec's relation with a clear margin."""
        lo, hi = self.object_size
        for attempt in range(200):
            shrink = 0.97 ** (attempt // 10)
            placed = _try_layout(spec, rng, lo * shrink, hi * shrink, self.gap)
            if placed is not None:
                return placed
        raise RuntimeError(f"could not place objects for {spec}; reduce ShapesWorld.object_size")


def _category_weights(categories: dict[str, float] | None) -> tuple[list[str], np.ndarray]:
    weights = categories or {c: 1.0 for c in CATEGORIES}
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise ValueError(f"ShapesWorld.categories: unknown {sorted(unknown)}; use {CATEGORIES}")
    names = [c for c in CATEGORIES if weights.get(c, 0) > 0]
    if not names:
        raise ValueError("ShapesWorld.categories: give at least one positive weight")
    probs = np.array([weights[c] for c in names], dtype=np.float64)
    return names, probs / probs.sum()


def sample_spec(category: str, rng: np.random.Generator) -> Spec:
    """Draw a random spec of one GenEval category."""
    a, b = (str(s) for s in rng.choice(SHAPES, size=2, replace=False))
    ca, cb = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    if category == "single_object":
        return make_spec(category, [obj(a)])
    if category == "two_object":
        return make_spec(category, [obj(a), obj(b)])
    if category == "counting":
        return make_spec(category, [obj(a, int(rng.integers(2, 5)))])
    if category == "colors":
        return make_spec(category, [obj(a, color=ca)])
    if category == "position":
        return make_spec(category, [obj(a), obj(b)], str(rng.choice(RELATIONS)))
    return make_spec("color_attr", [obj(a, color=ca), obj(b, color=cb)])


def _instances(spec: Spec, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(shape, colour) per object instance; unspecified colours are random, as in GenEval."""
    names = list(COLORS)
    out = []
    for o in spec["objects"]:
        for _ in range(o["count"]):
            out.append((o["shape"], o["color"] or names[int(rng.integers(len(names)))]))
    return out


def _try_layout(
    spec: Spec, rng: np.random.Generator, lo: float, hi: float, gap: float
) -> list[Placed] | None:
    placed: list[Placed] = []
    for shape, color in _instances(spec, rng):
        size = float(rng.uniform(lo, hi))
        margin = size / 2 + 0.03
        x, y = (float(v) for v in rng.uniform(margin, 1 - margin, size=2))
        candidate = Placed(shape, color, x, y, size)
        if any(_too_close(candidate, p, gap) for p in placed):
            return None
        placed.append(candidate)
    if "relation" in spec and not _clear_relation(placed[0], placed[1], spec["relation"]):
        return None
    return placed


def _too_close(a: Placed, b: Placed, gap: float) -> bool:
    half = (a.size + b.size) / 2
    return max(abs(a.x - b.x) - half, abs(a.y - b.y) - half) < gap


def _clear_relation(a: Placed, b: Placed, relation: str) -> bool:
    """a <relation> b along one axis, with the other axis offset under a third of it."""
    dx, dy = a.x - b.x, a.y - b.y
    along, across = {
        "left of": (-dx, dy),
        "right of": (dx, dy),
        "above": (-dy, dx),
        "below": (dy, dx),
    }[relation]
    return along > (a.size + b.size) / 2 and abs(across) < along / 3


def coverage(p: Placed, resolution: int) -> np.ndarray:
    """Anti-aliased coverage [R,R] in [0,1] of one object, by 4x4 supersampling of its box."""
    half = p.size / 2
    x0, x1 = _pixel_span(p.x, half, resolution)
    y0, y1 = _pixel_span(p.y, half, resolution)
    n = SUPERSAMPLE
    xs = (np.arange(x0 * n, x1 * n, dtype=np.float64) + 0.5) / (resolution * n)
    ys = (np.arange(y0 * n, y1 * n, dtype=np.float64) + 0.5) / (resolution * n)
    ys, xs = np.meshgrid(ys, xs, indexing="ij")
    if p.shape == "circle":
        inside = (xs - p.x) ** 2 + (ys - p.y) ** 2 <= half**2
    elif p.shape == "square":
        inside = (np.abs(xs - p.x) <= half) & (np.abs(ys - p.y) <= half)
    else:  # upright isosceles triangle, base = height = size
        top = p.y - half
        inside = (ys >= top) & (ys <= p.y + half) & (np.abs(xs - p.x) <= (ys - top) / 2)
    blocks = inside.reshape(y1 - y0, n, x1 - x0, n)  # h,s,w,s
    out = np.zeros((resolution, resolution), np.float32)
    out[y0:y1, x0:x1] = blocks.mean(axis=(1, 3))
    return out


def _pixel_span(center: float, half: float, resolution: int) -> tuple[int, int]:
    lo = max(int(np.floor((center - half) * resolution)) - 1, 0)
    hi = min(int(np.ceil((center + half) * resolution)) + 1, resolution)
    return lo, hi
