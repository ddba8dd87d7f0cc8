"""Matting datasets stored as folders of image files.

- :class:`ImageFolderMatting`: ready-made composites (AIM-500 / P3M style, or the output of
  :func:`~tasks.matting.data.synthetic.write_synthetic_folder`);
- :class:`Composition1kMatting`: Adobe Composition-1k, composited on the fly with the
  official rule (:func:`cover_background`, :func:`composite_truncated`).

Both index their files when constructed and fail there on a missing or unmatched file;
an unreadable file fails when its sample is loaded. Nothing is skipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from kdkit.data import MissingFileError, StemFolders, index_folder, read_image, require_same_size
from kdkit.errors import DataError

from .files import read_alpha, read_trimap
from .trimaps import DEFAULT_UNKNOWN, check_unknown_value, eval_trimap, random_trimap

__all__ = [
    "Composition1kMatting",
    "ImageFolderMatting",
    "composite_truncated",
    "cover_background",
]

class ImageFolderMatting(Dataset):
    """Composited samples from a plain folder layout, matched by file stem::

        root/image/<stem>.png|.jpg|.jpeg    the composite (RGB; an alpha channel is dropped)
        root/alpha/<stem>.*                 the matte, 8 or 16 bit
        root/trimap/<stem>.*                optional; values {0, unknown_value, 255}
        root/fg/<stem>.*, root/bg/<stem>.*  optional foreground / background colours

    Without ``trimap/`` the evaluation trimap is made from the alpha
    (:func:`~tasks.matting.data.trimaps.eval_trimap` with ``trimap_radius``). Files with
    other suffixes are ignored; a missing counterpart, a file without an image, an empty
    ``image/`` folder or a missing ``image/``/``alpha/`` folder raise when constructed.
    Items are sample dicts (``name`` = the stem), passed through ``transform`` if given.
    """

    def __init__(
        self,
        root: str | Path,
        unknown_value: int = DEFAULT_UNKNOWN,
        transform: Callable[[dict], dict] | None = None,
        trimap_radius: int = 10,
    ) -> None:
        self.root = Path(root)
        self.unknown_value = check_unknown_value(unknown_value)
        self.transform = transform
        self.trimap_radius = trimap_radius
        self.folders = StemFolders(self.root, ["alpha"], ["trimap", "fg", "bg"])

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> dict:
        stem, paths = self.folders.paths(index)
        sample: dict = {"image": read_image(paths["image"]), "alpha": read_alpha(paths["alpha"])}
        if "trimap" in paths:
            sample["trimap"] = read_trimap(paths["trimap"], self.unknown_value)
        else:
            sample["trimap"] = eval_trimap(sample["alpha"], self.trimap_radius, self.unknown_value)
        for key in ("fg", "bg"):
            if key in paths:
                sample[key] = read_image(paths[key])
        require_same_size(sample, paths, "alpha")
        sample["name"] = stem
        return self.transform(sample) if self.transform is not None else sample


def cover_background(bg: np.ndarray, height: int, width: int) -> np.ndarray:
    """The official Composition-1k background fit: if ``bg`` is smaller than
    ``height×width`` in either direction it is scaled by ``ratio = max(height/h_bg,
    width/w_bg)`` to ``ceil(w_bg·ratio) × ceil(h_bg·ratio)`` (``cv2.INTER_CUBIC``; the
    original script used PIL bicubic); larger backgrounds are not scaled. Then the top-left
    ``height×width`` is cropped. ``H×W×3`` uint8 in and out."""
    bg_height, bg_width = bg.shape[:2]
    ratio = max(width / bg_width, height / bg_height)
    if ratio > 1:
        size = (math.ceil(bg_width * ratio), math.ceil(bg_height * ratio))
        bg = cv2.resize(bg, size, interpolation=cv2.INTER_CUBIC)
    return bg[:height, :width]


def composite_truncated(fg: np.ndarray, bg: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """``image = int(α·F + (1 − α)·B)`` as the official Composition-1k script computes it:
    ``α = k/255`` in float64 (``k`` = the 8-bit matte value, recovered as ``rint(255·alpha)``),
    the same operation order, then truncation. ``fg``/``bg`` ``H×W×3`` uint8, ``alpha``
    ``H×W`` float in [0, 1]; returns ``H×W×3`` uint8."""
    a = (np.rint(alpha.astype(np.float64) * 255) / 255)[..., None]
    return np.trunc(a * fg.astype(np.float64) + (1 - a) * bg.astype(np.float64)).astype(np.uint8)


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise MissingFileError(f"name list {path} does not exist; check the dataset layout")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


class Composition1kMatting(Dataset):
    """Adobe Composition-1k, composited on the fly. Layout::

        root/fg/<name>          foreground colours (PNG/JPEG, any stem)
        root/alpha/<name>       alpha mattes, the same file names as fg/
        root/fg_names.txt       optional: the fg file names in order, one per line
                                (default: the sorted image files of fg/)
        root/bg/<file>          background images (MS-COCO / PASCAL VOC)
        root/bg_names.txt       background file names, one per line, in order
        root/trimaps/<name>     test split only: the dataset's trimaps, same names as fg/

    Sample ``k`` (``0 ≤ k < len(fg) · bg_per_fg``) is foreground ``k // bg_per_fg`` over the
    background on line ``k`` of ``bg_names.txt``, which must hold exactly
    ``len(fg) · bg_per_fg`` names (``bg_per_fg`` defaults to the official 100 for train
    and 20 for test). The background is fitted with :func:`cover_background` and the image
    composited with :func:`composite_truncated` (``int()`` truncation, as the official
    script). The test split reads ``trimaps/<name>`` (values ``{0, unknown_value, 255}``);
    the train split draws :func:`~tasks.matting.data.trimaps.random_trimap` from
    ``np.random.default_rng([seed, k])`` (a training transform usually redraws it).
    Items: ``image``, ``fg``, ``bg`` (the fitted crop), ``alpha``, ``trimap`` and ``name``
    ``"<fg stem>_<k % bg_per_fg>"`` (the official merged-file name), passed through
    ``transform`` if given.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        unknown_value: int = DEFAULT_UNKNOWN,
        transform: Callable[[dict], dict] | None = None,
        bg_per_fg: int | None = None,
        seed: int = 0,
    ) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
        self.root, self.split, self.seed = Path(root), split, seed
        self.unknown_value = check_unknown_value(unknown_value)
        self.transform = transform
        self.bg_per_fg = bg_per_fg if bg_per_fg is not None else {"train": 100, "test": 20}[split]
        if self.bg_per_fg < 1:
            raise ValueError(f"bg_per_fg must be at least 1, found {self.bg_per_fg}")
        if (self.root / "fg_names.txt").is_file():
            self.fg_names = _read_names(self.root / "fg_names.txt")
        else:
            self.fg_names = [path.name for path in index_folder(self.root / "fg").values()]
        if not self.fg_names:
            raise DataError(f"no foregrounds in {self.root / 'fg'}; check the dataset layout")
        self.bg_names = _read_names(self.root / "bg_names.txt")
        expected = len(self.fg_names) * self.bg_per_fg
        if len(self.bg_names) != expected:
            raise DataError(
                f"{self.root / 'bg_names.txt'} lists {len(self.bg_names)} backgrounds, expected "
                f"{len(self.fg_names)} foregrounds × bg_per_fg {self.bg_per_fg} = {expected}; "
                "pass the matching bg_per_fg or fix the list"
            )
        folders = [("fg", self.fg_names), ("alpha", self.fg_names), ("bg", self.bg_names)]
        if split == "test":
            folders.append(("trimaps", self.fg_names))
        for folder, names in folders:
            for name in names:
                if not (self.root / folder / name).is_file():
                    raise MissingFileError(
                        f"{self.root / folder / name} does not exist; every name listed for "
                        f"{folder}/ needs its file"
                    )

    def __len__(self) -> int:
        return len(self.bg_names)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        fg_name = self.fg_names[index // self.bg_per_fg]
        paths = {
            "fg": self.root / "fg" / fg_name,
            "alpha": self.root / "alpha" / fg_name,
            "bg": self.root / "bg" / self.bg_names[index],
        }
        fg, alpha = read_image(paths["fg"]), read_alpha(paths["alpha"])
        height, width = alpha.shape
        sample = {"fg": fg, "alpha": alpha}
        require_same_size(sample, paths, "alpha")
        bg = cover_background(read_image(paths["bg"]), height, width)
        sample.update(bg=bg, image=composite_truncated(fg, bg, alpha))
        if self.split == "test":
            paths["trimap"] = self.root / "trimaps" / fg_name
            sample["trimap"] = read_trimap(paths["trimap"], self.unknown_value)
            require_same_size(sample, paths, "alpha")
        else:
            rng = np.random.default_rng([self.seed, index])
            sample["trimap"] = random_trimap(alpha, rng, unknown_value=self.unknown_value)
        sample["name"] = f"{Path(fg_name).stem}_{index % self.bg_per_fg}"
        return self.transform(sample) if self.transform is not None else sample
