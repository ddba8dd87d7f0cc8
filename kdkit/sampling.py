"""The training data order: a fresh permutation per epoch, sharded across processes,
resumable mid-epoch, with every sample's augmentation keyed to ``(seed, epoch, index)``.

Together these make a resumed run draw exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from kdkit.data.random import sample_key

__all__ = ["KeyedSamples", "ResumableSampler", "endless_batches"]


class ResumableSampler(Sampler[tuple[int, int]]):
    """Yields ``(epoch, index)``: the permutation of epoch ``e`` comes from ``(seed, e)``;
    process ``rank`` of ``size`` takes every ``size``-th index from position ``rank`` (all
    shards equally long); iteration starts at ``start`` within the shard."""

    def __init__(self, length: int, seed: int, rank: int = 0, size: int = 1):
        self.length, self.seed, self.rank, self.size = length, seed, rank, size
        self.epoch, self.start = 0, 0

    @property
    def shard_length(self) -> int:
        return self.length // self.size

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        shard = order[self.rank:self.shard_length * self.size:self.size]
        for index in shard[self.start:]:
            yield self.epoch, index

    def __len__(self) -> int:
        return self.shard_length - self.start


class KeyedSamples(Dataset):
    """``dataset`` indexed by ``(epoch, index)``: each item is drawn under
    :func:`kdkit.data.random.sample_key` ``(seed, epoch, index)``, so transforms that draw
    from a :class:`~kdkit.data.random.WorkerRNG` are a function of that key alone.

    A dataset with a ``prepare()`` method (a :class:`~kdkit.data.SeededDataset` with a data
    pool) is prepared here, in the process that builds the loader, so DataLoader workers
    share what it made rather than each making its own."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        prepare = getattr(dataset, "prepare", None)
        if prepare is not None:
            prepare()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]):
        epoch, index = item
        with sample_key(self.seed, epoch, index):
            return self.dataset[index]


def endless_batches(loader: DataLoader, sampler: ResumableSampler, batch_size: int,
                    step: int) -> Iterator:
    """Batches without end, positioned at ``step`` (whole batches per epoch and process,
    the rest dropped)."""
    batches_per_epoch = sampler.shard_length // batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training set has {sampler.length} samples ({sampler.shard_length} per "
            f"process), fewer than one batch of {batch_size}; lower train.batch_size or add "
            "data"
        )
    sampler.epoch, offset = divmod(step, batches_per_epoch)
    sampler.start = offset * batch_size
    while True:
        yield from loader
        sampler.epoch, sampler.start = sampler.epoch + 1, 0
