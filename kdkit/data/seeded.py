"""Synthetic datasets whose sample ``i`` is a pure function of a seed, with train and
test seed ranges that never overlap, optionally drawn from a data pool."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.utils.data import Dataset

from kdkit.errors import DataError

from .pool import SamplePool, keep_fields

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
    """``length`` samples of ``split``: item ``i`` is ``generate(split_seed(split, i))``
    with only the array ``fields`` kept (all when ``None``; see
    :func:`~kdkit.data.pool.keep_fields`), passed through ``transform`` when one is given.

    With ``pool=N`` (``1 ≤ N ≤ length``) the first ``N`` samples are generated once, by
    :meth:`prepare`, into a :class:`~kdkit.data.pool.SamplePool`, and item ``i`` is pool
    sample ``i mod N`` through ``transform``: a random transform keyed per item (see
    :class:`kdkit.sampling.KeyedSamples`) draws a new view of it each time. With ``N =
    length`` the items equal those of the dataset without a pool, bit for bit."""

    def __init__(self, generate: Callable[[int], dict], split: str, length: int,
                 transform: Callable[[dict], dict] | None = None, pool: int | None = None,
                 fields: Sequence[str] | None = None) -> None:
        if length < 1:
            raise DataError(f"length must be at least 1, found {length}")
        if pool is not None and not 1 <= pool <= length:
            raise DataError(f"data.pool must be 1..{length} (the dataset's length), found "
                            f"{pool}; lower data.pool or raise the dataset's length")
        split_seed(split, length - 1)  # validates the split and the seed range
        self.generate, self.split, self.length = generate, split, length
        self.transform, self.pool_size, self.fields = transform, pool, fields
        self._pool: SamplePool | None = None

    def __len__(self) -> int:
        return self.length

    def prepare(self) -> None:
        """Build the pool, if the dataset has one and it is not built yet (every core, a
        progress bar). Call it before DataLoader workers start, so they share it;
        :class:`kdkit.sampling.KeyedSamples` does."""
        if self.pool_size is not None and self._pool is None:
            seeds = [split_seed(self.split, j) for j in range(self.pool_size)]
            self._pool = SamplePool.build(self.generate, seeds, self.fields)

    @property
    def sample_pool(self) -> SamplePool | None:
        """The pool once :meth:`prepare` has made it; ``None`` before, or without a pool."""
        return self._pool

    def sample(self, index: int) -> dict:
        """Item ``index`` before the transform."""
        if self.pool_size is None:
            return keep_fields(self.generate(split_seed(self.split, index)), self.fields)
        self.prepare()
        return self._pool[index % self.pool_size]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        sample = self.sample(index)
        return self.transform(sample) if self.transform is not None else sample
