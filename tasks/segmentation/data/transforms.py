"""Transforms from a sample dict of NumPy arrays to one of tensors.

Output: ``image`` 3×H×W float32 in [0, 1]; ``mask`` H×W int64 holding the class indices and
:data:`~.palette.IGNORE_INDEX` (255); ``name`` and any other key passed through. ``H×W`` is
``crop_size²`` for training and the input size for evaluation.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from kdkit.data.random import WorkerRNG
from kdkit.errors import DataError

from .palette import IGNORE_INDEX

__all__ = ["EvalTransform", "TrainTransform", "to_tensors"]


def to_tensors(sample: dict) -> dict:
    """The tensor form of a sample dict (see the module docstring)."""
    out = dict(sample)
    chw = np.ascontiguousarray(sample["image"].transpose(2, 0, 1))
    out["image"] = torch.from_numpy(chw).float().div_(255)
    out["mask"] = torch.from_numpy(np.ascontiguousarray(sample["mask"], np.int64))
    return out


class TrainTransform:
    """Random training view of a sample: scale, pad, crop, flip.

    Steps, with the random draws in this order:

    1. a scale ``s`` log-uniform in ``scale_range`` (``exp(uniform(log lo, log hi))``); the
       image is resized to ``round(s·W) × round(s·H)`` (at least 1) with ``INTER_LINEAR``,
       the mask with ``INTER_NEAREST_EXACT`` (nearest neighbour with the same pixel-centre
       alignment as ``INTER_LINEAR``, so the labels stay on their pixels);
    2. (no draw) padding at the bottom and right up to at least ``crop_size`` in each
       direction, the image with 0 and the mask with IGNORE_INDEX (255);
    3. the crop's top, then its left edge, each uniform over the valid offsets;
    4. a horizontal flip when ``rng.random() < 0.5``; then :func:`to_tensors`.

    Randomness: a :class:`kdkit.data.random.WorkerRNG` of ``seed``. Two transforms with the
    same seed called on the same samples give identical outputs.
    """

    def __init__(
        self,
        crop_size: int = 128,
        scale_range: tuple[float, float] = (0.5, 2.0),
        seed: int | None = None,
    ) -> None:
        low, high = (float(v) for v in scale_range)
        if crop_size < 1 or not 0 < low <= high:
            raise DataError(
                f"expected a positive data.crop_size and 0 < low <= high in "
                f"data.scale_range, found crop_size {crop_size} and scale_range "
                f"{list(scale_range)}"
            )
        self.crop_size, self.scale_range, self.seed = int(crop_size), (low, high), seed
        self._generator = WorkerRNG(seed)

    def __call__(self, sample: dict) -> dict:
        rng = self._generator()
        image, mask = sample["image"], sample["mask"]
        if image.shape[:2] != mask.shape:
            raise DataError(
                f"sample {sample.get('name', '?')}: image is {image.shape[1]}×{image.shape[0]} "
                f"but mask is {mask.shape[1]}×{mask.shape[0]}; they must match"
            )
        low, high = self.scale_range
        scale = float(np.exp(rng.uniform(np.log(low), np.log(high))))
        height, width = mask.shape
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        if size != (width, height):
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
            mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST_EXACT)

        crop = self.crop_size
        pad_h, pad_w = max(0, crop - mask.shape[0]), max(0, crop - mask.shape[1])
        if pad_h or pad_w:
            image = cv2.copyMakeBorder(image, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT, value=0)
            mask = cv2.copyMakeBorder(mask, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                                      value=IGNORE_INDEX)

        top = int(rng.integers(mask.shape[0] - crop + 1))
        left = int(rng.integers(mask.shape[1] - crop + 1))
        image = image[top : top + crop, left : left + crop]
        mask = mask[top : top + crop, left : left + crop]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        return to_tensors({**sample, "image": image, "mask": mask})


class EvalTransform:
    """Evaluation view: the full-resolution sample as tensors (:func:`to_tensors`)."""

    def __call__(self, sample: dict) -> dict:
        return to_tensors(sample)
