"""A contact sheet for looking at many samples at once."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

from kdkit.errors import DataError

__all__ = ["contact_sheet"]


def _tile(picture: np.ndarray, tile: int) -> np.ndarray:
    """``picture`` (``H×W×3`` uint8, ``H×W`` uint8, or ``H×W`` float in [0, 1])
    letterboxed into a black ``tile×tile×3`` uint8 square, shrunk with ``INTER_AREA``."""
    if np.issubdtype(picture.dtype, np.floating):
        picture = np.rint(np.clip(picture, 0, 1) * 255).astype(np.uint8)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=2)
    h, w = picture.shape[:2]
    scale = tile / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_NEAREST
    small = cv2.resize(picture, size, interpolation=interpolation)
    out = np.zeros((tile, tile, 3), np.uint8)
    out[: small.shape[0], : small.shape[1]] = small
    return out


def contact_sheet(samples: list[dict], keys: Sequence[str], tile: int = 128,
                  columns: int = 4) -> np.ndarray:
    """An RGB uint8 grid of up to 16 samples, each shown as one ``tile×tile`` tile per key
    of ``keys`` side by side, ``columns`` samples per row."""
    if not samples:
        raise DataError("contact_sheet needs at least one sample, found none")
    cells = [np.hstack([_tile(s[key], tile) for key in keys]) for s in samples[:16]]
    columns = min(columns, len(cells))
    blank = np.zeros_like(cells[0])
    cells += [blank] * (-len(cells) % columns)
    rows = [np.hstack(cells[r : r + columns]) for r in range(0, len(cells), columns)]
    return np.vstack(rows)
