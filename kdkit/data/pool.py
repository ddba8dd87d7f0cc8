"""A data pool: samples of a seeded generator made once, with every core, and kept as
uint8 arrays in RAM, so a training run draws random views of them instead of generating
every sample anew.

Kept in RAM rather than in memory-mapped files under a cache folder: DataLoader workers
started by ``fork`` (the default on Linux) share the pool's few large arrays without
copying them, nothing is written to disk, and no cache can outlive a change of the
generator and serve stale samples (a cache must be keyed on everything that produced it,
the generator's code included). Making the pool again costs seconds with every core; a
run resumed after a kill makes the same pool again, since every sample is a pure function
of its seed.

Storage: each array field of the samples is one ``N×…`` uint8 array. uint8 fields are kept
as they are; float32 fields in [0, 1] that are multiples of 1/255 (a synthetic
alpha) as ``k = rint(255·x)``, read back as ``float32(k) / float32(255)``; the pool checks
at build time that this reproduces every value bit for bit. Other fields (a name) are kept
in a list.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from functools import partial

import cv2
import numpy as np
from tqdm import tqdm

from kdkit.errors import DataError

from .workers import usable_cores

__all__ = ["SamplePool", "keep_fields"]

_SCALE = np.float32(255)


def keep_fields(sample: dict, fields: Sequence[str] | None) -> dict:
    """``sample`` with only the array entries named in ``fields`` (all when ``None``);
    entries that are not arrays (a name) are always kept."""
    if fields is None:
        return sample
    return {key: value for key, value in sample.items()
            if key in fields or not isinstance(value, np.ndarray)}


def _encode(key: str, value: np.ndarray) -> np.ndarray:
    """The uint8 form of one field (see the module docstring), checked to read back exactly."""
    if value.dtype == np.uint8:
        return value
    if value.dtype == np.float32:
        encoded = np.rint(np.clip(value, 0, 1) * 255).astype(np.uint8)
        if np.array_equal(_decode(encoded), value):
            return encoded
    raise DataError(
        f"the data pool keeps uint8 arrays and float32 multiples of 1/255 in [0, 1]; "
        f"field {key!r} is {value.dtype} and does not fit; remove data.pool for this data")


def _decode(encoded: np.ndarray) -> np.ndarray:
    return encoded.astype(np.float32) / _SCALE


def _compact(generate: Callable[[int], dict], fields: Sequence[str] | None,
             seed: int) -> tuple[dict, set[str]]:
    """One generated sample with its array fields encoded as uint8, and the names of the
    fields that were floating point."""
    sample = keep_fields(generate(seed), fields)
    floats = {key for key, value in sample.items()
              if isinstance(value, np.ndarray) and value.dtype.kind == "f"}
    return ({key: _encode(key, value) if isinstance(value, np.ndarray) else value
             for key, value in sample.items()}, floats)


def _one_thread() -> None:
    """Pool-process initialiser: OpenCV on one thread, as every core runs a process."""
    cv2.setNumThreads(1)


class SamplePool:
    """``N`` samples kept as uint8 arrays; ``pool[j]`` is sample ``j`` as the generator made
    it (fresh arrays, so a transform may change them in place).

    ``arrays``: field → ``N×…`` uint8 array; ``floats``: the fields stored from float32;
    ``others``: field → list of ``N`` non-array values."""

    def __init__(self, arrays: dict[str, np.ndarray], floats: set[str],
                 others: dict[str, list], length: int) -> None:
        self.arrays, self.floats, self.others, self.length = arrays, floats, others, length

    @classmethod
    def build(cls, generate: Callable[[int], dict], seeds: Sequence[int],
              fields: Sequence[str] | None = None, processes: int | None = None,
              progress: bool = True) -> SamplePool:
        """``generate(seed)`` for every seed, in a process pool of ``processes`` (default:
        every usable core; one process inside a daemonic process such as a DataLoader
        worker), with a progress bar. Every sample must have the same keys and array
        shapes; ``fields`` as in :func:`keep_fields`."""
        if processes is None:
            daemonic = multiprocessing.current_process().daemon
            processes = 1 if daemonic else usable_cores()
        make = partial(_compact, generate, fields)
        bar = tqdm(total=len(seeds), desc="data pool", unit="sample", disable=not progress)
        with bar:
            if processes <= 1 or len(seeds) == 1:
                samples = (make(seed) for seed in seeds)
                return cls._stack(samples, seeds, bar)
            chunk = max(1, len(seeds) // (8 * processes))
            with multiprocessing.Pool(processes, initializer=_one_thread) as workers:
                return cls._stack(workers.imap(make, seeds, chunksize=chunk), seeds, bar)

    @classmethod
    def _stack(cls, samples, seeds: Sequence[int], bar: tqdm) -> SamplePool:
        """The pool of ``samples`` (compacted, in seed order), filled as they arrive."""
        arrays: dict[str, np.ndarray] = {}
        others: dict[str, list] = {}
        floats: set[str] = set()
        for j, (seed, (sample, sample_floats)) in enumerate(zip(seeds, samples)):
            if j == 0:
                arrays = {k: np.empty((len(seeds), *v.shape), np.uint8)
                          for k, v in sample.items() if isinstance(v, np.ndarray)}
                others = {k: [] for k in sample if k not in arrays}
                floats = sample_floats
            if set(sample) != set(arrays) | set(others) or sample_floats != floats:
                raise DataError(
                    f"the data pool needs samples with the same fields and types; seed {seed} "
                    f"has {sorted(sample)} (float: {sorted(sample_floats)}), the first "
                    f"{sorted({*arrays, *others})} (float: {sorted(floats)})")
            for key, store in arrays.items():
                if sample[key].shape != store.shape[1:]:
                    raise DataError(
                        f"the data pool needs samples of one size; seed {seed}'s {key!r} is "
                        f"{sample[key].shape}, the first sample's {store.shape[1:]}")
                store[j] = sample[key]
            for key, values in others.items():
                values.append(sample[key])
            bar.update()
        return cls(arrays, floats, others, len(seeds))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, j: int) -> dict:
        sample = {key: values[j] for key, values in self.others.items()}
        for key, store in self.arrays.items():
            sample[key] = _decode(store[j]) if key in self.floats else store[j].copy()
        return sample

    @property
    def nbytes(self) -> int:
        """Bytes the arrays take."""
        return sum(store.nbytes for store in self.arrays.values())
