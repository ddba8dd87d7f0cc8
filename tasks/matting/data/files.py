"""Reading the matting-specific files: alpha mattes and trimaps (images go through
:mod:`kdkit.data.images`, which names the file in every error)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kdkit.data.images import imread
from kdkit.errors import DataError

from .trimaps import DEFAULT_UNKNOWN, normalise_trimap

__all__ = ["alpha_from_uint8", "read_alpha", "read_trimap"]


def alpha_from_uint8(alpha: np.ndarray) -> np.ndarray:
    """``H×W`` uint8 matte → float32 ``alpha / 255`` (the one conversion used everywhere, so
    a matte written as PNG reads back bit-identical)."""
    return alpha.astype(np.float32) / np.float32(255)


def read_alpha(path: str | Path) -> np.ndarray:
    """An ``H×W`` float32 alpha matte in ``[0, 1]`` from an 8- or 16-bit file; a multi-channel
    file contributes its first channel."""
    alpha = imread(path, cv2.IMREAD_UNCHANGED)
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    if alpha.dtype == np.uint8:
        return alpha_from_uint8(alpha)
    if alpha.dtype == np.uint16:
        return alpha.astype(np.float32) / np.float32(65535)
    raise DataError(f"alpha matte {path} has dtype {alpha.dtype}; expected an 8- or 16-bit image")


def read_trimap(path: str | Path, unknown_value: int = DEFAULT_UNKNOWN) -> np.ndarray:
    """An ``H×W`` uint8 trimap holding only ``0``, ``unknown_value`` and ``255``; see
    :func:`~tasks.matting.data.trimaps.normalise_trimap` (the error names the file)."""
    trimap = imread(path, cv2.IMREAD_UNCHANGED)
    try:
        return normalise_trimap(trimap, unknown_value)
    except ValueError as error:
        raise DataError(f"trimap {path}: {error}") from None
