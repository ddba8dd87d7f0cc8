"""Segmentation datasets stored as folders of image files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch.utils.data import Dataset

from kdkit.data import StemFolders, read_image, require_same_size

from .files import check_classes, read_mask, require_png

__all__ = ["FolderSegmentation"]

class FolderSegmentation(Dataset):
    """Samples from a plain folder layout, matched by file stem::

        root/image/<stem>.png|.jpg|.jpeg   the image (RGB; an alpha channel is dropped)
        root/mask/<stem>.png               the labels: class indices (single channel) or
                                           VOC colours, see files.read_mask

    Mask values must be ``< classes`` or 255 (ignore). Files with other suffixes are
    ignored; a missing or empty ``image/``, a missing ``mask/``, an image without a mask, a
    mask without an image or a mask that is not a PNG raise when constructed; an unreadable
    file, bad mask values or an image and mask of different sizes raise when the sample is
    loaded. Items are ``{"image", "mask", "name"}`` (``name`` = the stem), passed through
    ``transform`` when given.
    """

    def __init__(
        self,
        root: str | Path,
        classes: int,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        self.root = Path(root)
        self.classes = check_classes(classes)
        self.transform = transform
        self.folders = StemFolders(self.root, ["mask"])
        for path in self.folders.files["mask"].values():
            require_png(path)

    def __len__(self) -> int:
        return len(self.folders)

    def __getitem__(self, index: int) -> dict:
        stem, paths = self.folders.paths(index)
        sample: dict = {
            "image": read_image(paths["image"]),
            "mask": read_mask(paths["mask"], self.classes),
        }
        require_same_size(sample, paths, "mask")
        sample["name"] = stem
        return self.transform(sample) if self.transform is not None else sample
