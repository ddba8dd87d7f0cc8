"""Random generators for data transforms that behave the same in the main process and in
DataLoader workers."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

__all__ = ["WorkerRNG"]


class WorkerRNG:
    """A ``np.random.Generator`` per process: with ``seed`` it is ``default_rng(seed)`` in
    the main process and ``default_rng([seed, worker_seed])`` in a DataLoader worker;
    without, ``default_rng(torch.initial_seed())`` (torch's seed for the process, which
    differs per worker and per epoch). Call it to get the current process's generator."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self._key: int | None = None

    def __call__(self) -> np.random.Generator:
        info = get_worker_info()
        key = None if info is None else info.seed
        if self._rng is None or key != self._key:
            if self.seed is None:
                entropy = [torch.initial_seed()]
            else:
                entropy = [self.seed] if key is None else [self.seed, key]
            self._rng, self._key = np.random.default_rng(entropy), key
        return self._rng
