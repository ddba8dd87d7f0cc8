"""Data for the matting task: synthetic samples, folder datasets, trimaps and transforms.

A sample is a dict of NumPy arrays: ``image`` H×W×3 uint8 RGB, ``alpha`` H×W float32 in
[0, 1], ``trimap`` H×W uint8 with values 0 / unknown / 255 (unknown 128 unless configured),
``fg`` and ``bg`` H×W×3 uint8 RGB when available, and ``name`` (str). The transforms in
:mod:`.transforms` turn it into tensors.
"""

from __future__ import annotations

from kdkit.data import contact_sheet, read_image, split_seed, write_gray, write_image

from .files import read_alpha, read_trimap
from .folders import Composition1kMatting, ImageFolderMatting, composite_truncated
from .synthetic import BACKGROUNDS, SyntheticMatting, synthesize, write_synthetic_folder
from .transforms import EvalTransform, TrainTransform, to_tensors
from .trimaps import eval_trimap, normalise_trimap, random_trimap

__all__ = [
    "BACKGROUNDS",
    "Composition1kMatting",
    "EvalTransform",
    "ImageFolderMatting",
    "SyntheticMatting",
    "TrainTransform",
    "composite_truncated",
    "contact_sheet",
    "eval_trimap",
    "normalise_trimap",
    "random_trimap",
    "read_alpha",
    "read_image",
    "read_trimap",
    "split_seed",
    "synthesize",
    "to_tensors",
    "write_gray",
    "write_image",
    "write_synthetic_folder",
]
