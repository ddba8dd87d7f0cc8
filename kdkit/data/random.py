"""Random generators for data transforms that behave the same in the main process and in
DataLoader workers, and that the training loop can key to each drawn sample.

Under :func:`sample_key` (the training loop draws every sample under the key ``(run seed,
epoch, index)``), a :class:`WorkerRNG` returns a generator that is a pure function of its
seed and that key: augmentation no longer depends on which process draws the sample or on
what it drew before, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["WorkerRNG", "sample_key"]

_current_key: tuple[int, ...] | None = None


@contextmanager
def sample_key(*key: int) -> Iterator[None]:
    """Key every :class:`WorkerRNG` of this process to ``key`` while the block runs."""
    global _current_key
    previous, _current_key = _current_key, tuple(int(k) for k in key)
    try:
        yield
    finally:
        _current_key = previous


class WorkerRNG:
    """A ``np.random.Generator`` per process. Under :func:`sample_key` it is
    ``default_rng([seed, *key])`` (``[*key]`` without a seed), one generator per key.
    Otherwise, with ``seed`` it is ``default_rng(seed)`` in the main process and
    ``default_rng([seed, worker_seed])`` in a DataLoader worker; without,
    ``default_rng(torch.initial_seed())`` (torch's seed for the process, which differs per
    worker and per epoch). Call it to get the generator to draw from."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._key: tuple | None = None

    def __call__(self) -> np.random.Generator:
        if _current_key is not None:
            key = ("sample", *_current_key)
            entropy = list(_current_key) if self.seed is None else [self.seed, *_current_key]
        else:
            info = get_worker_info()
            key = ("worker", None if info is None else info.seed)
            if self.seed is None:
                entropy = [torch.initial_seed()]
            else:
                entropy = [self.seed] if key[1] is None else [self.seed, key[1]]
        if self._rng is None or key != self._key:
            self._rng, self._key = np.random.default_rng(entropy), key
        return self._rng
