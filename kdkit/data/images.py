"""Reading and writing image files.

Every read goes through :func:`imread`, which names the file in its error when it is
missing (:class:`MissingFileError`) or cannot be decoded (:class:`~kdkit.errors.DataError`).
Colour images come back as RGB (OpenCV reads BGR); single-channel maps come back as ``H×W``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from kdkit.errors import DataError, MissingFileError

__all__ = ["IMAGE_SUFFIXES", "MissingFileError", "imread", "read_image", "write_gray",
           "write_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def imread(path: str | Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    """``cv2.imread(path, flags)``, raising instead of returning ``None``."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"image file {path} does not exist; check the dataset layout")
    image = cv2.imread(str(path), flags)
    if image is None:
        raise DataError(
            f"could not decode image file {path}: expected a readable PNG or JPEG; "
            "replace or remove the corrupt file"
        )
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An ``H×W×3`` uint8 RGB image (grey images are expanded, an alpha channel is dropped)."""
    return cv2.cvtColor(imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _imwrite(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write image file {path}; check the folder is writable")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an ``H×W×3`` uint8 RGB image (format from the suffix)."""
    _imwrite(Path(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def write_gray(path: str | Path, image: np.ndarray) -> None:
    """Write an ``H×W`` uint8 single-channel image (a matte ×255, a trimap, a label map)."""
    _imwrite(Path(path), image)
