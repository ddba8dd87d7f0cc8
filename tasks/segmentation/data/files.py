"""Reading and writing mask files (images go through :mod:`kdkit.data.images`, which names
the file in every error).

A mask file is a lossless PNG, either

- single-channel 8-bit: the class indices themselves (Cityscapes ``labelIds`` / ADE20K
  style), or
- colour: the PASCAL VOC colours of :func:`~.palette.voc_palette`. VOC's own palette-mode
  (``P``) PNGs are decoded to colour by OpenCV and land here too; an alpha channel is
  dropped.

Either way the values must be class indices ``< classes`` or the ignore index 255.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kdkit.data.images import imread, write_image
from kdkit.errors import DataError

from .palette import IGNORE_INDEX, colourise, mask_from_colours

__all__ = ["check_classes", "check_labels", "read_mask", "require_png", "write_mask"]


def check_classes(classes: int) -> int:
    """``classes`` as an int, or DataError when it is not in ``1..255`` (255 is the ignore
    index, so at most 255 classes ``0..254``)."""
    if isinstance(classes, bool) or int(classes) != classes or not 1 <= classes <= 255:
        raise DataError(
            f"data.classes must be an integer in 1..255 (255 is the ignore index), found "
            f"{classes!r}"
        )
    return int(classes)


def require_png(path: str | Path) -> Path:
    """``path`` as a Path, or DataError when it is not a ``.png`` (a lossy JPEG changes
    label values at every edge)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise DataError(
            f"mask {path} is not a PNG; masks must be stored losslessly (JPEG compression "
            "changes label values at edges), save it as .png"
        )
    return path


def check_labels(mask: np.ndarray, classes: int, source: str | Path) -> np.ndarray:
    """``mask`` (``H×W`` uint8) after checking every value is ``< classes`` or 255; the
    DataError names ``source``, up to 5 offending values and ``classes``."""
    counts = np.bincount(mask.ravel(), minlength=256)
    counts[IGNORE_INDEX] = 0
    bad = np.flatnonzero(counts[classes:]) + classes
    if bad.size:
        shown = ", ".join(str(v) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise DataError(
            f"mask {source} holds class values {{{shown}}} but classes is {classes} (valid: "
            f"0..{classes - 1} and {IGNORE_INDEX} = ignore); set data.classes to at least "
            f"{int(bad.max()) + 1} or fix the mask"
        )
    return mask


def read_mask(path: str | Path, classes: int) -> np.ndarray:
    """The ``H×W`` uint8 label map stored in the PNG ``path`` (see the module docstring),
    checked against ``classes``."""
    classes = check_classes(classes)
    path = require_png(path)
    raw = imread(path, cv2.IMREAD_UNCHANGED)
    if raw.dtype != np.uint8:
        raise DataError(
            f"mask {path} has dtype {raw.dtype}; expected an 8-bit PNG (class indices or VOC "
            "colours), re-save it with 8 bits per channel"
        )
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[..., 0]
    if raw.ndim == 2:
        mask = raw
    elif raw.shape[2] in (3, 4):
        mask = mask_from_colours(cv2.cvtColor(raw[..., :3], cv2.COLOR_BGR2RGB), path)
    else:
        raise DataError(
            f"mask {path} has {raw.shape[2]} channels; expected 1 (class indices) or 3/4 "
            "(VOC colours)"
        )
    return check_labels(mask, classes, path)


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write an ``H×W`` uint8 label map as a VOC-coloured RGB PNG (viewable, and read back
    identically by :func:`read_mask`)."""
    path = require_png(path)
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise DataError(
            f"expected an H×W uint8 label map for {path}, found shape {mask.shape} and dtype "
            f"{mask.dtype}"
        )
    write_image(path, colourise(mask))
