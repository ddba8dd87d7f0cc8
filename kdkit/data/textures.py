"""Procedural textures for synthetic datasets, deterministic given a NumPy generator.

A texture is a scalar pattern (smooth noise, warped stripes or a noisy checker) mapped
through a random colour palette; drawing two textures through one palette gives regions
that colour alone does not separate. Smooth fields are computed on a grid of at most
:func:`low_resolution` pixels and upsampled bilinearly (they are smooth, so this is cheap
and loses nothing visible).
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["low_resolution", "palette", "rotated_coordinates", "smooth_noise", "texture",
           "upsample"]


def low_resolution(size: int) -> int:
    """Side of the grid on which smooth fields are computed before a bilinear upsample."""
    return min(size, max(32, size // 4))


def upsample(field: np.ndarray, size: int) -> np.ndarray:
    """A square field resized bilinearly to ``size×size`` (returned as is if already so)."""
    if field.shape[0] == size:
        return field
    return cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """``size×size`` float32 smooth noise in [0, 1]: a ``cells²`` random grid, bicubic-
    resized to the low resolution, normalised, then bilinear-upsampled."""
    grid = rng.random((cells, cells), dtype=np.float32)
    low_size = low_resolution(size)
    field = cv2.resize(grid, (low_size, low_size), interpolation=cv2.INTER_CUBIC)
    low, high = float(field.min()), float(field.max())
    field = (field - low) * np.float32(1.0 / max(high - low, 1e-6))
    return upsample(field, size)


def palette(rng: np.random.Generator) -> np.ndarray:
    """A ``256×1×3`` uint8 lookup table: a colour ramp through 3–6 random anchor colours."""
    anchors = rng.integers(0, 256, size=(int(rng.integers(3, 7)), 3)).astype(np.float64)
    where = np.linspace(0, 255, len(anchors))
    ramp = [np.interp(np.arange(256), where, anchors[:, c]) for c in range(3)]
    return np.rint(np.stack(ramp, axis=1)).astype(np.uint8)[:, None, :]


def rotated_coordinates(angle: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``size×size`` float32 pixel coordinates ``(u, v)`` rotated by ``angle`` (radians)."""
    x = np.arange(size, dtype=np.float32)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x[None, :] * c + x[:, None] * s, x[:, None] * c - x[None, :] * s


def texture(rng: np.random.Generator, size: int, colours: np.ndarray) -> np.ndarray:
    """A ``size×size×3`` uint8 texture: a scalar pattern (smooth noise, warped stripes or a
    noisy checker) mapped through the ``colours`` lookup table (see :func:`palette`)."""
    kind = int(rng.integers(3))
    noise = smooth_noise(rng, size, int(rng.integers(3, 7)))
    if kind == 0:
        field = 0.6 * noise + 0.4 * smooth_noise(rng, size, int(rng.integers(10, 25)))
    elif kind == 1:
        u, _ = rotated_coordinates(rng.uniform(0, np.pi), size)
        period = size / rng.uniform(4, 14)
        field = 0.5 + 0.5 * np.sin((u / period + 1.5 * noise) * np.float32(2 * np.pi))
    else:
        u, v = rotated_coordinates(rng.uniform(0, np.pi), size)
        period = size / rng.uniform(3, 10)
        checker = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        field = 0.55 * checker + 0.45 * noise
    index = np.clip(field * 255, 0, 255).astype(np.uint8)
    return cv2.LUT(cv2.merge([index, index, index]), colours)
