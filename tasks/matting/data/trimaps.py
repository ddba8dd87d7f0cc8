"""Trimaps: ``H×W`` uint8 maps with ``0`` = definite background, ``255`` = definite
foreground and ``unknown_value`` (default 128, configurable because datasets differ) = unknown.

- :func:`eval_trimap`: the fixed evaluation trimap made from a ground-truth alpha;
- :func:`random_trimap`: a random training trimap (eroded definite regions);
- :func:`normalise_trimap`: validate a trimap read from disk.

Definite foreground is ``alpha >= 1`` and definite background ``alpha <= 0`` exactly, so any
fractional alpha is unknown.
"""

from __future__ import annotations

import cv2
import numpy as np

from kdkit.errors import DataError

__all__ = [
    "DEFAULT_UNKNOWN",
    "check_unknown_value",
    "eval_trimap",
    "normalise_trimap",
    "random_trimap",
]

DEFAULT_UNKNOWN = 128


def check_unknown_value(unknown_value: int) -> int:
    """``unknown_value`` as an int, or DataError when it is not in ``1..254``."""
    if (
        isinstance(unknown_value, bool)
        or int(unknown_value) != unknown_value
        or not (1 <= unknown_value <= 254)
    ):
        raise DataError(
            f"data.unknown_value must be an integer in 1..254 (0 and 255 are the definite "
            f"regions), found {unknown_value!r}"
        )
    return int(unknown_value)


def _check_alpha(alpha: np.ndarray) -> None:
    if alpha.ndim != 2 or not np.issubdtype(alpha.dtype, np.floating):
        raise ValueError(
            f"expected an H×W float alpha in [0, 1], found shape {alpha.shape} and dtype "
            f"{alpha.dtype}; convert uint8 mattes with alpha / 255"
        )


def _assemble(fg: np.ndarray, bg: np.ndarray, unknown_value: int) -> np.ndarray:
    trimap = np.full(fg.shape, unknown_value, np.uint8)
    trimap[fg] = 255
    trimap[bg] = 0
    return trimap


def eval_trimap(
    alpha: np.ndarray, radius: int = 10, unknown_value: int = DEFAULT_UNKNOWN
) -> np.ndarray:
    """The evaluation trimap of an ``H×W`` float alpha: unknown where ``0 < alpha < 1``,
    dilated by ``radius`` pixels (an elliptical ``(2·radius+1)²`` kernel, i.e. a disc) so
    that every edge lies inside the unknown region; ``255`` / ``0`` on the rest of the
    ``alpha >= 1`` / ``alpha <= 0`` pixels. Returns ``H×W`` uint8."""
    _check_alpha(alpha)
    unknown_value = check_unknown_value(unknown_value)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, found {radius}")
    fg = alpha >= 1
    bg = alpha <= 0
    unknown = (~(fg | bg)).view(np.uint8)
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        unknown = cv2.dilate(unknown, kernel)
    keep = unknown == 0
    return _assemble(fg & keep, bg & keep, unknown_value)


def random_trimap(
    alpha: np.ndarray,
    rng: np.random.Generator,
    kernel_range: tuple[int, int] = (1, 30),
    unknown_value: int = DEFAULT_UNKNOWN,
) -> np.ndarray:
    """A random training trimap of an ``H×W`` float alpha: the definite foreground
    (``alpha >= 1``) and definite background (``alpha <= 0``) masks are each eroded by an
    elliptical kernel ``cv2.getStructuringElement(MORPH_ELLIPSE, (k, k))`` with its own
    ``k`` drawn uniformly from ``kernel_range`` (inclusive; ``k = 1`` leaves a mask as it
    is); all other pixels are unknown. Deterministic given ``rng``. Returns ``H×W`` uint8."""
    _check_alpha(alpha)
    unknown_value = check_unknown_value(unknown_value)
    low, high = kernel_range
    if not 1 <= low <= high:
        raise ValueError(f"kernel_range must satisfy 1 <= low <= high, found {kernel_range}")
    k_fg, k_bg = rng.integers(low, high + 1, size=2)
    masks = []
    for mask, k in (((alpha >= 1), k_fg), ((alpha <= 0), k_bg)):
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (int(k), int(k)))
        masks.append(cv2.erode(mask.view(np.uint8), kernel).view(bool))
    return _assemble(masks[0], masks[1], unknown_value)


def normalise_trimap(trimap: np.ndarray, unknown_value: int = DEFAULT_UNKNOWN) -> np.ndarray:
    """An ``H×W`` uint8 copy of ``trimap`` after checking its values.

    Accepts ``H×W`` or ``H×W×C`` (e.g. an RGB or RGBA PNG: channel 0 is used) of any
    integer or float dtype. The values are kept in the dataset's own convention (no
    remapping), so they must lie in ``{0, unknown_value, 255}``; anything else raises a
    DataError naming the unexpected values.
    """
    unknown_value = check_unknown_value(unknown_value)
    if trimap.ndim == 3:
        trimap = trimap[..., 0]
    if trimap.ndim != 2:
        raise DataError(f"expected an H×W or H×W×C trimap, found shape {trimap.shape}")
    if trimap.dtype == np.uint8:
        present = np.flatnonzero(np.bincount(trimap.ravel(), minlength=256))
    else:
        present = np.unique(trimap)
    unexpected = np.setdiff1d(present, (0, unknown_value, 255))
    if unexpected.size:
        shown = ", ".join(f"{v:g}" for v in unexpected[:8]) + (
            ", ..." if unexpected.size > 8 else ""
        )
        hint = (
            f"; if {unexpected[0]:g} marks the unknown region, set data.unknown_value: "
            f"{unexpected[0]:g} in the config (or --set data.unknown_value={unexpected[0]:g})"
            if unexpected.size == 1
            else "; the file is not a trimap with three levels (resized with interpolation?)"
        )
        raise DataError(
            f"trimap holds values {{{shown}}} besides the expected {{0, {unknown_value}, 255}}"
            + hint
        )
    return trimap.astype(np.uint8)
