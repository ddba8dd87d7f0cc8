"""Running a network at another resolution than its input's (``kdkit predict --long-side``).

A model trained on small crops meets a photograph whose structures are several times
larger than anything it saw; resizing the photo so that its longer side has ``long_side``
pixels shows it at the scale the model learned, and the prediction is resized back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdkit.errors import ConfigError

__all__ = ["at_long_side", "long_side_size", "resize_smooth"]


def long_side_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """``(h, w)``: ``height × width`` scaled so that the longer side is ``long_side``
    (each side rounded, at least 1)."""
    if long_side < 1:
        raise ConfigError(f"--long-side must be a positive number of pixels, found {long_side}")
    scale = long_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_smooth(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B×C×H×W`` images or score maps → ``B×C×size``: area averaging where a side shrinks
    (no aliasing), bilinear where both grow."""
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.interpolate(x, size, mode="area")
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


def at_long_side(forward: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                 image: torch.Tensor, long_side: int | None,
                 guide: torch.Tensor | None = None) -> torch.Tensor:
    """``forward(image, guide)`` → ``B×K×H×W`` for a ``B×C×H×W`` ``image``, run on the image
    shown at ``long_side`` (:func:`resize_smooth`; the ``guide``, such as a trimap, by
    nearest neighbour) and its output resized back to ``H×W`` (bilinear). ``None``: at
    full resolution, as it is."""
    if long_side is None:
        return forward(image, guide)
    height, width = image.shape[-2:]
    size = long_side_size(height, width, long_side)
    small_guide = None if guide is None else F.interpolate(guide, size, mode="nearest")
    out = forward(resize_smooth(image, size), small_guide)
    return F.interpolate(out, (height, width), mode="bilinear", align_corners=False)
