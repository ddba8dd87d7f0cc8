"""Natural photographs for the backgrounds and colours of synthetic samples.

``natural``: the photographs scikit-image ships inside its wheel (``skimage/data/``), read
straight from the package folder with OpenCV, so nothing is ever downloaded (scikit-image's
own loaders may fetch other images with pooch; they are not used). :data:`BUNDLED` names
them with their authors and licences (from the docstrings of ``skimage.data``); the ones in
:data:`TEST_PHOTOS` serve the test split only, the rest the train split only. A folder of
the user's own photos (``.jpg``/``.jpeg``/``.png``, sorted by file name) splits the same way
by position: photo ``i`` is a test photo when ``i % 4 == 0``, a training photo otherwise.

Photos are decoded once per process (cached), as RGB uint8 with the long side at most
:data:`MAX_SIDE`, plus a pyramid of halvings so a crop is never shrunk more than 2× by
bilinear sampling. :func:`random_patch` cuts an augmented square from one.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from kdkit.data.images import read_image
from kdkit.errors import DataError

__all__ = [
    "BUNDLED",
    "MAX_SIDE",
    "PHOTO_SUFFIXES",
    "TEST_PHOTOS",
    "photo_pyramid",
    "photo_sources",
    "random_patch",
]


@dataclass(frozen=True)
class BundledPhoto:
    """A photograph in scikit-image's wheel: ``file`` under ``skimage/data/``."""

    name: str
    file: str
    author: str
    licence: str


#: The photographs in scikit-image's wheel that are used, with author and licence.
BUNDLED = (
    BundledPhoto("astronaut", "astronaut.png", "NASA (Eileen Collins)", "public domain"),
    BundledPhoto("chelsea", "chelsea.png", "Stefan van der Walt", "CC0"),
    BundledPhoto("coffee", "coffee.png", "Rachel Michetti", "CC0"),
    BundledPhoto("rocket", "rocket.jpg", "SpaceX", "public domain"),
    BundledPhoto("hubble_deep_field", "hubble_deep_field.jpg", "NASA", "public domain"),
    BundledPhoto("retina", "retina.jpg", "Mikael Häggström", "CC0"),
    BundledPhoto("immunohistochemistry", "ihc.png", "CMMI", "no known copyright restrictions"),
    BundledPhoto("camera", "camera.png", "Lav Varshney", "CC0"),
    BundledPhoto("coins", "coins.png", "Brooklyn Museum", "no known copyright restrictions"),
    BundledPhoto("grass", "grass.png", "linolafett (DeviantArt)", "CC0"),
    BundledPhoto("gravel", "gravel.png", "CC0Textures", "CC0"),
    BundledPhoto("brick", "brick.png", "CC0Textures", "CC0"),
)

#: Bundled photos held out for the test split; the others are for training only.
TEST_PHOTOS = ("coffee", "rocket", "coins")

MAX_SIDE = 1024
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
_MIN_LEVEL_SIDE = 32
_LUMA = np.array([0.299, 0.587, 0.114])


def _bundled_folder() -> Path:
    """``skimage/data`` in the installed package, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.backgrounds: natural needs scikit-image, whose wheel holds the "
                        "photos; pip install 'scikit-image>=0.26', or set data.backgrounds "
                        "to procedural or a folder of photos")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _folder_sources(root: Path, split: str) -> tuple[tuple[str, str], ...]:
    """(name, path) of the photos of ``split`` in ``root`` (see the module docstring)."""
    if not root.is_dir():
        raise DataError(f"data.backgrounds: {root} is not a folder; give a folder of .jpg/.png "
                        "photos, or natural or procedural")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)
    if len(files) < 2:
        raise DataError(f"data.backgrounds: {root} holds {len(files)} .jpg/.png photo(s); it "
                        "needs at least 2 (every fourth by sorted name, from the first, is a "
                        "test photo, the others training photos)")
    chosen = [p for i, p in enumerate(files) if (i % 4 == 0) == (split == "test")]
    return tuple((p.name, str(p)) for p in chosen)


@lru_cache(maxsize=16)
def photo_sources(backgrounds: str, split: str) -> tuple[tuple[str, str], ...]:
    """(name, file path) of the photos ``split`` draws from: the bundled photos for
    ``"natural"`` (:data:`TEST_PHOTOS` for ``"test"``, the rest for ``"train"``), else
    those of the folder ``backgrounds``."""
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; expected train or test")
    if backgrounds != "natural":
        return _folder_sources(Path(backgrounds).expanduser(), split)
    folder = _bundled_folder()
    return tuple((p.name, str(folder / p.file)) for p in BUNDLED
                 if (p.name in TEST_PHOTOS) == (split == "test"))


@lru_cache(maxsize=32)
def photo_pyramid(path: str) -> tuple[np.ndarray, ...]:
    """The photo at ``path`` as read-only ``H×W×3`` uint8 RGB (long side at most
    :data:`MAX_SIDE`), then halvings of it down to a short side of 32 or more pixels."""
    image = read_image(path)
    scale = MAX_SIDE / max(image.shape[:2])
    if scale < 1:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    levels = [image]
    while min(levels[-1].shape[:2]) >= 2 * _MIN_LEVEL_SIDE:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // 2, h // 2), interpolation=cv2.INTER_AREA))
    for level in levels:
        level.setflags(write=False)
    return tuple(levels)


def _hue_rotation(angle: float) -> np.ndarray:
    """3×3 rotation of RGB about the grey axis by ``angle`` (a hue shift; greys unchanged)."""
    axis = np.ones(3) / math.sqrt(3)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return (math.cos(angle) * np.eye(3) + math.sin(angle) * cross
            + (1 - math.cos(angle)) * np.outer(axis, axis))


def _colour_matrix(rng: np.random.Generator, mean_luma: float) -> np.ndarray:
    """3×4 affine RGB map: saturation ×0.6–1.4 about each pixel's luma, a hue shift of up to
    ±180° half the time, a colour cast (each channel ×0.8–1.2, which tints grey photos),
    contrast ×0.75–1.25 about ``mean_luma``, brightness ×0.75–1.25."""
    saturation, contrast, brightness, shift = rng.uniform([0.6, 0.75, 0.75, 0],
                                                          [1.4, 1.25, 1.25, 1])
    angle = rng.uniform(-math.pi, math.pi) if shift < 0.5 else 0.0
    cast = rng.uniform(0.8, 1.2, size=3)
    mix = saturation * np.eye(3) + (1 - saturation) * np.outer(np.ones(3), _LUMA)
    gain = brightness * contrast * np.diag(cast) @ _hue_rotation(angle) @ mix
    offset = brightness * (1 - contrast) * mean_luma * cast[:, None]
    return np.hstack([gain, offset])


def random_patch(rng: np.random.Generator, pyramid: tuple[np.ndarray, ...],
                 size: int) -> np.ndarray:
    """``size×size×3`` uint8 RGB: a square of the photo (side 35–100 % of the largest that
    fits at the drawn angle), rotated by up to ±10°, mirrored half the time, resized to
    ``size`` and colour-jittered (:func:`_colour_matrix`); all draws from ``rng``."""
    angle = rng.uniform(-np.pi / 18, np.pi / 18)
    fraction, flip, u, v = rng.uniform([0.35, 0, 0, 0], [1, 1, 1, 1])
    spread = abs(math.cos(angle)) + abs(math.sin(angle))
    h, w = pyramid[0].shape[:2]
    side = fraction * min(h, w) / spread
    level = min(len(pyramid) - 1, max(0, math.floor(math.log2(side / size))))
    photo, shrink = pyramid[level], 2.0 ** -level
    half = side * spread / 2  # half the rotated square's bounding box
    centre = np.array([half + u * (w - 2 * half), half + v * (h - 2 * half)]) * shrink
    step = side * shrink / size
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    linear = step * rotation @ np.diag([-1.0 if flip < 0.5 else 1.0, 1.0])
    offset = centre - linear @ np.full(2, (size - 1) / 2)
    patch = cv2.warpAffine(photo, np.hstack([linear, offset[:, None]]), (size, size),
                           flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                           borderMode=cv2.BORDER_REFLECT_101)
    mean_luma = float(np.dot(cv2.mean(patch)[:3], _LUMA))
    return cv2.transform(patch, _colour_matrix(rng, mean_luma))
