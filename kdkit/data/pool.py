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
import time
from collections.abc import Callable, Sequence
from functools import partial
from itertools import chain

import cv2
import numpy as np
from tqdm import tqdm

from kdkit.errors import DataError

from .workers import usable_cores

__all__ = ["SPAWN_SECONDS", "SamplePool", "keep_fields"]

_SCALE = np.float32(255)

#: About the seconds a pool of spawned processes takes to start (each imports the
#: generator's modules, torch among them); a pool quicker than this to make in the calling
#: process is made there.
SPAWN_SECONDS = 2.0


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


def _default_processes(seconds_here: float) -> int:
    """Processes to make a pool whose remaining samples take ``seconds_here`` in this
    process (see :meth:`SamplePool.build`)."""
    if multiprocessing.current_process().daemon or seconds_here < SPAWN_SECONDS:
        return 1
    return usable_cores()


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
        """``generate(seed)`` for every seed, with a progress bar; ``fields`` as in
        :func:`keep_fields`. Every sample must have the same keys and array shapes.

        The first sample is made here; the rest in a pool of ``processes`` spawned
        processes, ``generate`` pickled to them (a module-level function or a
        ``functools.partial`` of one). By default: every usable core, unless this is a
        daemonic process (a DataLoader worker) or the rest would take less than
        :data:`SPAWN_SECONDS` here, at the first sample's pace; then all are made here. The
        samples do not depend on where they are made."""
        make = partial(_compact, generate, fields)
        bar = tqdm(total=len(seeds), desc="data pool", unit="sample", disable=not progress)
        with bar:
            start = time.perf_counter()
            first = make(seeds[0])
            rest = seeds[1:]
            if processes is None:
                processes = _default_processes((time.perf_counter() - start) * len(rest))
            if processes <= 1 or not rest:
                return cls._stack(chain([first], map(make, rest)), seeds, bar)
            chunk = max(1, len(rest) // (8 * processes))
            # spawned, not forked: a fork of a process whose thread pools (torch's, OpenCV's)
            # have run can deadlock in the child
            spawn = multiprocessing.get_context("spawn")
            with spawn.Pool(processes, initializer=_one_thread) as workers:
                made = workers.imap(make, rest, chunksize=chunk)
                return cls._stack(chain([first], made), seeds, bar)

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
