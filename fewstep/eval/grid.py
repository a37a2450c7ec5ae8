"""Image grids with captions, for sample sheets and reports."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(image: np.ndarray) -> np.ndarray:
    """HxWx3 float in [0,1] (or uint8) -> uint8."""
    if image.dtype == np.uint8:
        return image
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def captioned_grid(
    images: Sequence[np.ndarray],
    captions: Sequence[str] | None = None,
    cols: int = 6,
    cell: int = 128,
    caption_lines: int = 3,
) -> Image.Image:
    """Tile HxWx3 images (upscaled to ``cell`` px) with wrapped captions under each."""
    rows = (len(images) + cols - 1) // cols
    font = ImageFont.load_default()
    text_h = 13 * caption_lines + 2 if captions else 0
    sheet = Image.new("RGB", (cols * (cell + 4), rows * (cell + text_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    chars = max(8, cell // 6)
    for i, image in enumerate(images):
        x, y = (i % cols) * (cell + 4) + 2, (i // cols) * (cell + text_h + 4) + 2
        tile = Image.fromarray(to_uint8(image)).resize((cell, cell), Image.NEAREST)
        sheet.paste(tile, (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            draw.multiline_text((x, y + cell + 1), "\n".join(lines), fill="black", font=font)
    return sheet
