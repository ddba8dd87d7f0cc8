"""Reading and writing the image files of matting datasets.

Every image read in this package goes through :func:`_imread`, which names the file in its
error when it is missing or cannot be decoded. Colour images come back as RGB (OpenCV reads
BGR); single-channel maps come back as ``H×W``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .trimaps import DEFAULT_UNKNOWN, normalise_trimap

__all__ = [
    "IMAGE_SUFFIXES",
    "alpha_from_uint8",
    "read_alpha",
    "read_image",
    "read_trimap",
    "write_gray",
    "write_image",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _imread(path: str | Path, flags: int) -> np.ndarray:
    """``cv2.imread(path, flags)``, raising instead of returning ``None``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist; check the dataset layout")
    image = cv2.imread(str(path), flags)
    if image is None:
        raise ValueError(
            f"could not decode image file {path}: expected a readable PNG or JPEG; "
            "replace or remove the corrupt file"
        )
    return image


def read_image(path: str | Path) -> np.ndarray:
    """An ``H×W×3`` uint8 RGB image (grey images are expanded, an alpha channel is dropped)."""
    return cv2.cvtColor(_imread(path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def alpha_from_uint8(alpha: np.ndarray) -> np.ndarray:
    """``H×W`` uint8 matte → float32 ``alpha / 255`` (the one conversion used everywhere, so
    a matte written as PNG reads back bit-identical)."""
    return alpha.astype(np.float32) / np.float32(255)


def read_alpha(path: str | Path) -> np.ndarray:
    """An ``H×W`` float32 alpha matte in ``[0, 1]`` from an 8- or 16-bit file; a multi-channel
    file contributes its first channel."""
    alpha = _imread(path, cv2.IMREAD_UNCHANGED)
    if alpha.ndim == 3:
        alpha = alpha[..., 0]
    if alpha.dtype == np.uint8:
        return alpha_from_uint8(alpha)
    if alpha.dtype == np.uint16:
        return alpha.astype(np.float32) / np.float32(65535)
    raise ValueError(f"alpha matte {path} has dtype {alpha.dtype}; expected an 8- or 16-bit image")


def read_trimap(path: str | Path, unknown_value: int = DEFAULT_UNKNOWN) -> np.ndarray:
    """An ``H×W`` uint8 trimap holding only ``0``, ``unknown_value`` and ``255``; see
    :func:`~tasks.matting.data.trimaps.normalise_trimap` (the error names the file)."""
    trimap = _imread(path, cv2.IMREAD_UNCHANGED)
    try:
        return normalise_trimap(trimap, unknown_value)
    except ValueError as error:
        raise ValueError(f"trimap {path}: {error}") from None


def _imwrite(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write image file {path}; check the folder is writable")


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Write an ``H×W×3`` uint8 RGB image (format from the suffix)."""
    _imwrite(Path(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def write_gray(path: str | Path, image: np.ndarray) -> None:
    """Write an ``H×W`` uint8 single-channel image (alpha ×255 or trimap)."""
    _imwrite(Path(path), image)
