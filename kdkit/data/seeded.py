"""Synthetic datasets whose sample ``i`` is a pure function of a seed, with train and
test seed ranges that never overlap."""

from __future__ import annotations

from collections.abc import Callable

from torch.utils.data import Dataset

from kdkit.errors import DataError

__all__ = ["SPLIT_SEED_OFFSETS", "SeededDataset", "split_seed"]

#: Seed of sample ``i`` of a split is ``SPLIT_SEED_OFFSETS[split] + i``; a train split is
#: limited to 10 000 000 samples so the ranges never overlap.
SPLIT_SEED_OFFSETS = {"train": 0, "test": 10_000_000}


def split_seed(split: str, index: int) -> int:
    """The generator seed of sample ``index`` of ``split`` (``"train"``: ``index``,
    ``"test"``: ``10_000_000 + index``)."""
    if split not in SPLIT_SEED_OFFSETS:
        raise DataError(
            f"unknown split {split!r}; expected one of {', '.join(SPLIT_SEED_OFFSETS)}"
        )
    if not 0 <= index < SPLIT_SEED_OFFSETS["test"]:
        raise DataError(
            f"sample index must be in 0..{SPLIT_SEED_OFFSETS['test'] - 1} so the train and "
            f"test seed ranges stay disjoint, found {index}"
        )
    return SPLIT_SEED_OFFSETS[split] + index


class SeededDataset(Dataset):
    """``length`` samples of ``split``: item ``i`` is ``generate(split_seed(split, i))``,
    passed through ``transform`` when one is given."""

    def __init__(self, generate: Callable[[int], dict], split: str, length: int,
                 transform: Callable[[dict], dict] | None = None) -> None:
        if length < 1:
            raise DataError(f"length must be at least 1, found {length}")
        split_seed(split, length - 1)  # validates the split and the seed range
        self.generate, self.split, self.length = generate, split, length
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        sample = self.generate(split_seed(self.split, index))
        return self.transform(sample) if self.transform is not None else sample
