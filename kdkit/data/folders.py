"""Folder datasets: files of one sample share a stem across sibling folders
(``root/image/0001.png``, ``root/alpha/0001.png``, ``root/mask/0001.png``, …).

Indexing fails on a missing or unmatched file, never skips one silently.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kdkit.errors import DataError

from .images import IMAGE_SUFFIXES, MissingFileError

__all__ = ["StemFolders", "empty_output_folder", "index_folder", "index_images",
           "match_stems", "require_same_size", "source_files", "source_pairs"]

_SUFFIX_TEXT = "|".join(IMAGE_SUFFIXES)


def index_folder(folder: str | Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem (suffixes in IMAGE_SUFFIXES, any case)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"folder {folder} does not exist; check the dataset layout")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in files:
            raise DataError(
                f"two files share the stem {path.stem!r}: {files[path.stem]} and {path}; "
                "keep one per sample"
            )
        files[path.stem] = path
    return files


def index_images(root: Path, partner: str) -> dict[str, Path]:
    """The images of a folder dataset, ``root/image/<stem>.*`` by stem; an empty or
    missing ``image/`` is an error that names the expected layout (``image/`` beside
    ``partner/``)."""
    images = index_folder(root / "image")
    if not images:
        raise DataError(f"no images ({_SUFFIX_TEXT}) in {root / 'image'}; point root at a "
                         f"folder holding image/ and {partner}/")
    return images


def match_stems(images: dict[str, Path], others: dict[str, Path],
                folder: Path) -> dict[str, Path]:
    """``others`` (indexed from ``folder``) restricted to the stems of ``images``, which
    must match one to one."""
    missing = sorted(images.keys() - others.keys())
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise MissingFileError(
            f"no file {folder / missing[0]}.{{{_SUFFIX_TEXT.replace('.', '')}}} for image "
            f"{images[missing[0]]}{more}; every image needs a counterpart in {folder}"
        )
    extra = sorted(others.keys() - images.keys())
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise DataError(
            f"{others[extra[0]]} has no image of the same stem{more}; add the image or "
            "remove the file"
        )
    return others


class StemFolders:
    """The files of a folder dataset, by sample: ``root/image/<stem>.*`` and the file of the
    same stem in each companion folder. ``required`` folders must exist and match the images
    one to one; ``optional`` ones are matched the same way when they exist."""

    def __init__(self, root: str | Path, required: Sequence[str],
                 optional: Sequence[str] = ()) -> None:
        root = Path(root)
        images = index_images(root, required[0])
        self.files = {"image": images}
        for key in (*required, *(key for key in optional if (root / key).is_dir())):
            self.files[key] = match_stems(images, index_folder(root / key), root / key)
        self.stems = sorted(images)

    def __len__(self) -> int:
        return len(self.stems)

    def paths(self, index: int) -> tuple[str, dict[str, Path]]:
        """(stem, folder → path) of sample ``index``."""
        stem = self.stems[index]
        return stem, {key: files[stem] for key, files in self.files.items()}


def require_same_size(sample: dict, paths: dict[str, Path], reference: str) -> None:
    """Every array of ``sample`` must have the height and width of ``sample[reference]``;
    the error names both files."""
    height, width = sample[reference].shape[:2]
    for key, value in sample.items():
        if isinstance(value, np.ndarray) and value.shape[:2] != (height, width):
            raise DataError(
                f"{paths.get(key, key)} is {value.shape[1]}×{value.shape[0]} but the "
                f"{reference} {paths[reference]} is {width}×{height}; all files of a sample "
                "must match"
            )


def source_files(inputs: str | Path) -> list[Path]:
    """The image files to predict on: one file, or a folder's image files by name."""
    path = Path(inputs)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise MissingFileError(f"no such image file or folder: {path}")
    files = list(index_folder(path).values())
    if not files:
        raise MissingFileError(f"no images ({_SUFFIX_TEXT}) in {path}")
    return files


def source_pairs(inputs: str | Path, guides: str | Path) -> list[tuple[Path, Path]]:
    """(image, guide) path pairs for prediction: two files, or two folders matched by
    file stem (a guide is a per-image input such as a trimap)."""
    images = source_files(inputs)
    guide_path = Path(guides)
    if Path(inputs).is_file():
        if not guide_path.is_file():
            raise MissingFileError(f"no such guide file: {guide_path}")
        return [(images[0], guide_path)]
    by_stem = index_folder(guide_path)
    pairs = []
    for image in images:
        if image.stem not in by_stem:
            raise MissingFileError(f"no file for {image.name} in {guide_path} (same stem)")
        pairs.append((image, by_stem[image.stem]))
    return pairs


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _holds_samples(path: Path) -> bool:
    """An image file, or a folder of image files only (what a synthetic dataset writes)."""
    return _is_image(path) or (path.is_dir() and all(map(_is_image, path.iterdir())))


def _listing(paths: list[Path]) -> str:
    names = [p.name + ("/" if p.is_dir() else "") for p in paths[:4]]
    return ", ".join(names) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")


def empty_output_folder(folder: str | Path, overwrite: bool) -> Path:
    """``folder``, created, for a new generated dataset. A folder that already holds files
    is refused (naming them) unless ``overwrite``, which deletes the image files and the
    folders of image files there first; anything else there is refused even then."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"--out {folder} is a file, not a folder; choose another --out")
    entries = sorted(folder.iterdir()) if folder.is_dir() else []
    if entries and not overwrite:
        raise DataError(f"--out {folder} is not empty (it holds {_listing(entries)}); pass "
                        "--overwrite to replace its samples, or choose another --out")
    others = [path for path in entries if not _holds_samples(path)]
    if others:
        raise DataError(f"--overwrite only deletes image files and folders of them, but "
                        f"{folder} also holds {_listing(others)}; choose another --out")
    for path in entries:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder
