"""Milliseconds per training batch on one core: synthesis on the fly against a data pool.

    .venv/bin/python benchmarks/data_speed.py [--batches 20] [--pool 64]

Each case loads batches as a training run with ``num_workers: 0`` does (keyed samples,
the training transform, default collation) in the main process, threads pinned to one:
first with every sample synthesised anew (no ``data.pool``), then drawn from a pool of
``--pool`` samples made beforehand. The pool's own making is reported apart (wall time
with every core, and its size in RAM). Cases: the tiny presets' data (matting and
segmentation) and the gpu preset's matting data (320² samples, 160² crops, batch 16),
matting with and without fg/bg (``data.fields``). Prints a Markdown table headed by the
command and the kdkit provenance line."""

from __future__ import annotations

import argparse
import platform
import shlex
import statistics
import sys
import time

import cv2
import torch
from torch.utils.data import DataLoader

from kdkit.data import usable_cores
from kdkit.provenance import provenance_line
from kdkit.sampling import KeyedSamples, ResumableSampler
from tasks.matting.task import MattingTask
from tasks.segmentation.task import SegmentationTask

LEAN = ["image", "alpha", "trimap"]
TINY_MATTING = {"kind": "synthetic", "train_length": 20000, "size": 96,
                "crop_sizes": [64, 80, 96], "output_size": 64}
GPU_MATTING = {"kind": "synthetic", "train_length": 100000, "size": 320,
               "crop_sizes": [160, 240, 320], "output_size": 160}
TINY_SEGMENTATION = {"kind": "synthetic", "classes": 6, "train_length": 20000, "size": 96,
                     "crop_size": 64, "scale_range": [0.75, 1.0], "camouflage": False}
#: (name, task, data, batch size)
CASES = [
    ("matting tiny (96² → 64², fg/bg)", MattingTask(), TINY_MATTING, 8),
    ("matting tiny (96² → 64², no fg/bg)", MattingTask(), {**TINY_MATTING, "fields": LEAN}, 8),
    ("matting gpu (320² → 160², fg/bg)", MattingTask(), GPU_MATTING, 16),
    ("matting gpu (320² → 160², no fg/bg)", MattingTask(), {**GPU_MATTING, "fields": LEAN}, 16),
    ("segmentation tiny (96² → 64²)", SegmentationTask(), TINY_SEGMENTATION, 8),
]


def batch_times(dataset, batch_size: int, batches: int) -> list[float]:
    """Milliseconds to load each of ``batches`` batches (after one to warm up)."""
    sampler = ResumableSampler(len(dataset), seed=0)
    loader = iter(DataLoader(KeyedSamples(dataset, 0), batch_size=batch_size,
                             sampler=sampler, drop_last=True))
    next(loader)
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(loader)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def pooled(task, data: dict, pool: int):
    """The training set with a pool of ``pool`` samples, made now; (set, seconds, MiB)."""
    train_set = task.datasets({**data, "pool": pool})[0]
    start = time.perf_counter()
    train_set.prepare()
    seconds = time.perf_counter() - start
    return train_set, seconds, train_set.sample_pool.nbytes / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--pool", type=int, default=64)
    args = parser.parse_args()
    print(f"`{shlex.join(['python', *sys.argv])}` on {platform.machine()} with "
          f"{usable_cores()} usable cores; {provenance_line()}\n")
    print("| data | batch | synthesised: ms/batch (median, p95) | pooled: ms/batch "
          "(median, p95) | pool: samples, s to make, MiB |")
    print("|---|---|---|---|---|")
    for name, task, data, batch in CASES:
        train_set, seconds, mib = pooled(task, data, args.pool)  # every core
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        rows = []
        for dataset in (task.datasets(data)[0], train_set):
            times = sorted(batch_times(dataset, batch, args.batches))
            rows.append(f"{statistics.median(times):.1f}, "
                        f"{times[int(0.95 * (len(times) - 1))]:.1f}")
        cv2.setNumThreads(-1)
        print(f"| {name} | {batch} | {rows[0]} | {rows[1]} | {args.pool}, {seconds:.1f}, "
              f"{mib:.0f} |")


if __name__ == "__main__":
    main()
