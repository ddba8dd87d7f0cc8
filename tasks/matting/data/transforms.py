"""Transforms from a sample dict of NumPy arrays to one of tensors.

Output (``H×W`` = ``output_size²`` for training, the input size for evaluation):
``image`` 3×H×W float32 in [0, 1]; ``alpha`` 1×H×W float32 in [0, 1]; ``trimap`` 1×H×W
float32 holding the raw values 0 / unknown_value / 255 (so a loss finds the unknown region
as ``trimap == unknown_value``); ``fg`` / ``bg`` 3×H×W float32 in [0, 1] when present;
``name`` passed through.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from kdkit.data.random import WorkerRNG
from kdkit.errors import DataError

from .trimaps import DEFAULT_UNKNOWN, check_unknown_value, normalise_trimap, random_trimap

__all__ = ["EvalTransform", "TrainTransform", "to_tensors"]

_COLOUR_KEYS = ("image", "fg", "bg")


def to_tensors(sample: dict) -> dict:
    """The tensor form of a sample dict (see the module docstring); keys other than image,
    fg, bg, alpha and trimap are passed through unchanged."""
    out = dict(sample)
    for key in _COLOUR_KEYS:
        if key in sample:
            chw = np.ascontiguousarray(sample[key].transpose(2, 0, 1))
            out[key] = torch.from_numpy(chw).float().div_(255)
    out["alpha"] = torch.from_numpy(np.ascontiguousarray(sample["alpha"], np.float32))[None]
    out["trimap"] = torch.from_numpy(np.ascontiguousarray(sample["trimap"], np.float32))[None]
    return out


def _pad_to(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Symmetric (mirror) padding, split evenly, up to at least ``height×width``."""
    pad_h, pad_w = max(0, height - array.shape[0]), max(0, width - array.shape[1])
    if not pad_h and not pad_w:
        return array
    pads = [(pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)]
    return np.pad(array, pads + [(0, 0)] * (array.ndim - 2), mode="symmetric")


class TrainTransform:
    """Random training view of a sample with an ``alpha``.

    Steps, in this order of random draws:

    1. a new trimap from the alpha with
       :func:`~tasks.matting.data.trimaps.random_trimap` (unknown value ``unknown_value``,
       erosion kernels drawn from ``trimap_kernel``; the dataset's trimap is replaced);
    2. a crop size ``c`` from ``crop_sizes``; arrays smaller than ``c×c`` are mirror-padded;
    3. a ``c×c`` crop centred on a random unknown pixel (any pixel if there is none),
       shifted as little as needed to stay inside the image, so that pixel stays in it;
    4. resize to ``output_size²`` when ``c`` differs (image/fg/bg/alpha ``INTER_LINEAR``,
       trimap ``INTER_NEAREST``);
    5. a horizontal flip with probability 1/2; then :func:`to_tensors`.

    Randomness: a :class:`kdkit.data.random.WorkerRNG` of ``seed``. Two transforms with the
    same seed called on the same samples give identical outputs.
    """

    def __init__(
        self,
        crop_sizes: Sequence[int] = (320, 480, 640),
        output_size: int = 320,
        unknown_value: int = DEFAULT_UNKNOWN,
        seed: int | None = None,
        trimap_kernel: tuple[int, int] = (1, 30),
    ) -> None:
        if not crop_sizes or min(crop_sizes) < 1 or output_size < 1:
            raise DataError(
                f"expected a non-empty positive data.crop_sizes and a positive "
                f"data.output_size, found crop_sizes {list(crop_sizes)} and output_size "
                f"{output_size}"
            )
        self.crop_sizes = tuple(int(c) for c in crop_sizes)
        self.output_size = output_size
        self.unknown_value = check_unknown_value(unknown_value)
        self.trimap_kernel = trimap_kernel
        self.seed = seed
        self._generator = WorkerRNG(seed)


    def __call__(self, sample: dict) -> dict:
        if "alpha" not in sample:
            raise ValueError(
                f"TrainTransform needs an 'alpha' in the sample, found keys {sorted(sample)}; "
                "training samples must carry their ground-truth matte"
            )
        rng = self._generator()
        out = dict(sample)
        out["trimap"] = random_trimap(sample["alpha"], rng, self.trimap_kernel,
                                      unknown_value=self.unknown_value)
        keys = [key for key in (*_COLOUR_KEYS, "alpha", "trimap") if key in out]

        crop = int(rng.choice(self.crop_sizes))
        for key in keys:
            out[key] = _pad_to(out[key], crop, crop)
        height, width = out["alpha"].shape
        unknown = np.flatnonzero(out["trimap"] == self.unknown_value)
        pool = unknown.size if unknown.size else height * width
        centre = int(rng.integers(pool))
        if unknown.size:
            centre = int(unknown[centre])
        cy, cx = divmod(centre, width)
        top = min(max(cy - crop // 2, 0), height - crop)
        left = min(max(cx - crop // 2, 0), width - crop)
        for key in keys:
            out[key] = out[key][top : top + crop, left : left + crop]

        if crop != self.output_size:
            size = (self.output_size, self.output_size)
            for key in keys:
                nearest = key == "trimap"
                out[key] = cv2.resize(
                    out[key], size, interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
                )
            out["alpha"] = np.clip(out["alpha"], 0, 1)

        if rng.random() < 0.5:
            for key in keys:
                out[key] = out[key][:, ::-1]
        return to_tensors(out)


class EvalTransform:
    """Evaluation view: no crop, resize or flip; checks that the trimap holds only
    ``{0, unknown_value, 255}`` (a dataset with another unknown value fails loudly rather
    than evaluating the wrong region) and has an unknown region (the metrics are sums over
    it: an image without one would score a perfect 0), then :func:`to_tensors`."""

    def __init__(self, unknown_value: int = DEFAULT_UNKNOWN) -> None:
        self.unknown_value = check_unknown_value(unknown_value)

    def __call__(self, sample: dict) -> dict:
        out = dict(sample)
        out["trimap"] = normalise_trimap(sample["trimap"], self.unknown_value)
        if not (out["trimap"] == self.unknown_value).any():
            raise DataError(
                f"sample {sample.get('name', '?')}: its trimap has no unknown pixels (value "
                f"{self.unknown_value}), so there is nothing to evaluate; check data."
                "unknown_value, or remove the image from the test set")
        return to_tensors(out)
