"""Data for the semantic segmentation task: VOC colour masks, synthetic scenes, folder
datasets and transforms.

A sample is a dict: ``image`` H×W×3 uint8 RGB, ``mask`` H×W uint8 class indices
``0..classes-1`` with :data:`IGNORE_INDEX` (255) = ignore, and ``name`` (str). The
transforms in :mod:`.transforms` turn it into tensors.
"""

from __future__ import annotations

from .files import check_classes, read_mask, write_mask
from .folders import FolderSegmentation
from .palette import IGNORE_INDEX, colourise, mask_from_colours, voc_palette
from .synthetic import (
    FAMILIES,
    MAX_CLASSES,
    SyntheticSegmentation,
    synthesize_scene,
    write_synthetic_folder,
)
from .transforms import EvalTransform, TrainTransform, to_tensors

__all__ = [
    "FAMILIES",
    "IGNORE_INDEX",
    "MAX_CLASSES",
    "EvalTransform",
    "FolderSegmentation",
    "SyntheticSegmentation",
    "TrainTransform",
    "check_classes",
    "colourise",
    "mask_from_colours",
    "read_mask",
    "synthesize_scene",
    "to_tensors",
    "voc_palette",
    "write_mask",
    "write_synthetic_folder",
]
