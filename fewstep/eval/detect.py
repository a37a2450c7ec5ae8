"""Weight-free object detection for shapes-world images: chroma segmentation, connected
components, and shape classification from sub-pixel profile features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from fewstep.data.prompts import COLORS

_EIGHT = np.ones((3, 3), dtype=bool)
_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # K,3
_NAMES = list(COLORS)


@dataclass(frozen=True)
class Detection:
    """One detected object; coordinates are pixels, ``box`` is (x0, y0, x1, y1)."""

    shape: str
    color: str
    area: float
    x: float
    y: float
    box: tuple[float, float, float, float]
    fill: float
    skew: float


def to_float_image(image: np.ndarray) -> np.ndarray:
    """HxWx3 array (uint8, or float in [0,1]) -> float32 in [0,1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255
    return np.clip(image.astype(np.float32), 0, 1)


def hue_degrees(rgb: np.ndarray) -> np.ndarray:
    """Hue angle in [0, 360) of RGB values (HSV hexcone model)."""
    r, g, b = np.moveaxis(rgb, -1, 0)
    hx = 0.5 * (2 * r - g - b)
    hy = np.sqrt(3) / 2 * (g - b)
    return np.degrees(np.arctan2(hy, hx)) % 360


_PALETTE_HUE = hue_degrees(_PALETTE)  # K
_PALETTE_CHROMA = _PALETTE.max(axis=1) - _PALETTE.min(axis=1)  # K


def nearest_color(hue: np.ndarray) -> np.ndarray:
    """Index of the palette colour with the nearest hue (circular distance)."""
    diff = np.abs(hue[..., None] - _PALETTE_HUE)  # ...,K
    return np.minimum(diff, 360 - diff).argmin(axis=-1)


MIN_OBJECT_FRAC = 0.01  # half the smallest shapes-world object (triangle of side 0.2: 0.02)
MAX_STRAY_FRAC = 0.02  # more colour than this outside objects: clutter, not a scene


@dataclass(frozen=True)
class Scene:
    """Detected objects and the fraction of the image that is coloured but in no object (what
    a trained detector would not see as objects: speckle, fragments, smears)."""

    objects: list[Detection]
    stray: float

    @property
    def cluttered(self) -> bool:
        """True when the stray colour exceeds ``MAX_STRAY_FRAC`` of the image."""
        return self.stray > MAX_STRAY_FRAC


def detect_objects(image: np.ndarray, min_area_frac: float = MIN_OBJECT_FRAC) -> list[Detection]:
    """Find coloured objects on an achromatic background and classify their shapes."""
    return analyse(image, min_area_frac).objects


def analyse(image: np.ndarray, min_area_frac: float = MIN_OBJECT_FRAC) -> Scene:
    """Objects (components of one palette colour of at least ``min_area_frac`` of the image)
    and the stray coloured fraction outside them."""
    img = to_float_image(image)
    chroma = img.max(axis=2) - img.min(axis=2)  # H,W
    floor = float(np.median(chroma))  # background noise level: most pixels are background
    excess = np.maximum(chroma - floor, 0)
    color_idx = nearest_color(hue_degrees(img))  # H,W
    scale = np.maximum(_PALETTE_CHROMA - floor, 1e-3)  # K
    alpha = np.clip(excess / scale[color_idx], 0, 1)  # coverage estimate, H,W
    mask = alpha > 0.5
    min_area = min_area_frac * img.shape[0] * img.shape[1]
    components = []
    for k in range(len(_NAMES)):
        labels, count = ndimage.label(mask & (color_idx == k), structure=_EIGHT)
        for i in range(1, count + 1):
            component = labels == i
            if component.sum() >= min_area:
                components.append((k, component))
    taken = np.zeros_like(mask)
    for _, component in components:
        taken |= component
    near_objects = ndimage.binary_dilation(taken, structure=_EIGHT, iterations=2)
    stray = float((mask & ~near_objects).mean())
    objects = [_describe(k, comp, excess / scale[k], taken & ~comp) for k, comp in components]
    return Scene(objects, stray)


def _describe(k: int, component: np.ndarray, alpha: np.ndarray, others: np.ndarray) -> Detection:
    """Measure area, centroid, box and shape features of one component."""
    region = ndimage.binary_dilation(component, structure=_EIGHT, iterations=2) & ~others
    soft = np.where(region, np.clip(alpha, 0, 1), 0.0)  # H,W
    rows, cols = soft.sum(axis=1), soft.sum(axis=0)
    area = float(soft.sum())
    ys, xs = np.arange(soft.shape[0]), np.arange(soft.shape[1])
    cy, cx = float(rows @ ys / area), float(cols @ xs / area)
    fill = area / max(rows.max() * cols.max(), 1e-6)
    var = float(rows @ (ys - cy) ** 2 / area)
    skew = float(rows @ (ys - cy) ** 3 / area) / max(var, 1e-6) ** 1.5
    yy, xx = np.nonzero(component)
    box = (float(xx.min()), float(yy.min()), float(xx.max() + 1), float(yy.max() + 1))
    return Detection(classify_shape(fill, skew), _NAMES[k], area, cx, cy, box, fill, skew)


def classify_shape(fill: float, skew: float) -> str:
    """Triangles are bottom-heavy (negative vertical skew); squares fill their extent."""
    if skew < -0.25:
        return "triangle"
    return "square" if fill > 0.88 else "circle"
