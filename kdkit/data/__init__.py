"""Data utilities shared by task packages: image files with clear errors, folder
datasets matched by file stem, seeded synthetic datasets and their data pool, procedural
textures, contact sheets and the number of loader workers. Nothing here knows about a
particular task."""

from __future__ import annotations

from .folders import (
    StemFolders,
    empty_output_folder,
    index_folder,
    index_images,
    match_stems,
    require_same_size,
    source_files,
    source_pairs,
)
from .images import IMAGE_SUFFIXES, MissingFileError, imread, read_image, write_gray, write_image
from .pool import SamplePool, keep_fields
from .preview import contact_sheet
from .seeded import SPLIT_SEED_OFFSETS, SeededDataset, split_seed
from .workers import AUTO, NumWorkers, resolve_num_workers, usable_cores

__all__ = [
    "AUTO",
    "IMAGE_SUFFIXES",
    "SPLIT_SEED_OFFSETS",
    "MissingFileError",
    "NumWorkers",
    "SamplePool",
    "SeededDataset",
    "StemFolders",
    "contact_sheet",
    "empty_output_folder",
    "imread",
    "index_folder",
    "index_images",
    "keep_fields",
    "match_stems",
    "read_image",
    "require_same_size",
    "resolve_num_workers",
    "source_files",
    "source_pairs",
    "split_seed",
    "usable_cores",
    "write_gray",
    "write_image",
]
