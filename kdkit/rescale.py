"""Running a network at another resolution than its input's (``kdkit predict --long-side``).

A model trained on small crops meets a photograph whose structures are several times
larger than anything it saw; resizing the photo so that its longer side has ``long_side``
pixels shows it at the scale the model learned, and the prediction is resized back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.errors import ConfigError

__all__ = ["long_side_size", "resize_smooth"]


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
