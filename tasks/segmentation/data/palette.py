"""Label maps and their PASCAL VOC colours.

A label map (a *mask*) is an ``H×W`` uint8 array of class indices ``0..classes-1``, with
:data:`IGNORE_INDEX` (255) marking pixels that no loss or metric counts. On disk and in
previews a mask is shown in the PASCAL VOC colour map (:func:`voc_palette`), the convention
of VOC's own ``SegmentationClass`` PNGs: class 0 black, 1 dark red, 2 dark green, …, and
255 the cream ``(224, 224, 192)`` of VOC's object boundaries.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from kdkit.errors import DataError

__all__ = ["IGNORE_INDEX", "colourise", "mask_from_colours", "voc_palette"]

IGNORE_INDEX = 255


@cache
def _palette256() -> np.ndarray:
    index = np.arange(256)
    colours = np.zeros((256, 3), np.int64)
    for j in range(8):
        for channel in range(3):
            colours[:, channel] |= ((index >> (3 * j + channel)) & 1) << (7 - j)
    colours = colours.astype(np.uint8)
    colours.flags.writeable = False
    return colours


def voc_palette(n: int = 256) -> np.ndarray:
    """The first ``n`` colours (``n×3`` uint8 RGB, ``n`` in 1..256) of the PASCAL VOC colour
    map: bit ``k`` of class ``i`` goes to bit ``7 − k // 3`` of channel ``k % 3`` (R, G, B),
    so 0 → (0, 0, 0), 1 → (128, 0, 0), 2 → (0, 128, 0), 255 → (224, 224, 192)."""
    if not 1 <= n <= 256:
        raise ValueError(f"voc_palette has 1..256 colours, asked for {n}")
    return _palette256()[:n].copy()


def colourise(mask: np.ndarray) -> np.ndarray:
    """``H×W`` label map (uint8, or any integer dtype with values 0..255) → ``H×W×3`` uint8
    RGB in the VOC colours (:data:`IGNORE_INDEX` becomes (224, 224, 192))."""
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise ValueError(
            f"expected an H×W integer label map, found shape {mask.shape} and dtype {mask.dtype}"
        )
    if mask.dtype != np.uint8:
        if mask.size and (mask.min() < 0 or mask.max() > 255):
            raise ValueError(
                f"label values must lie in 0..255 to have a VOC colour, found "
                f"{mask.min()}..{mask.max()}"
            )
        mask = mask.astype(np.uint8)
    return _palette256()[mask]


def _keys(rgb: np.ndarray) -> np.ndarray:
    """One int per colour, ``r·2¹⁶ + g·2⁸ + b``."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def mask_from_colours(rgb: np.ndarray, path: str | Path) -> np.ndarray:
    """The ``H×W`` uint8 label map of an ``H×W×3`` uint8 RGB image in VOC colours (the
    inverse of :func:`colourise`). A colour outside the VOC map raises a DataError naming
    ``path`` (the file it came from), the first such colour in raster order and how many
    pixels have unknown colours."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise DataError(
            f"colour mask {path}: expected an H×W×3 uint8 RGB image, found shape {rgb.shape} "
            f"and dtype {rgb.dtype}"
        )
    table = _keys(_palette256())
    order = np.argsort(table)
    sorted_keys = table[order]
    keys = _keys(rgb)
    where = np.minimum(np.searchsorted(sorted_keys, keys), 255)
    known = sorted_keys[where] == keys
    if not known.all():
        bad = np.flatnonzero(~known.ravel())
        y, x = divmod(int(bad[0]), rgb.shape[1])
        colour = tuple(int(c) for c in rgb[y, x])
        raise DataError(
            f"colour mask {path} has {bad.size} pixel(s) with colours outside the PASCAL VOC "
            f"palette, the first RGB {colour} at (x={x}, y={y}); a colour mask must use the "
            "VOC colours exactly (saved losslessly as PNG, not resized with interpolation), "
            "or store class indices in a single-channel PNG"
        )
    return order[where].astype(np.uint8)
