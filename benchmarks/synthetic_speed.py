"""Time a task's synthetic generator on one core.

    .venv/bin/python benchmarks/synthetic_speed.py [--task matting|segmentation]
        [--size 512] [--samples 50]

Prints the median and 95th-percentile milliseconds per sample (threads pinned to one)
and the kdkit commit and library versions."""

import argparse
import platform
import statistics
import time

import cv2
import torch

from kdkit.provenance import provenance_line
from tasks.matting.data import synthesize
from tasks.segmentation.data import synthesize_scene

GENERATORS = {"matting": synthesize, "segmentation": synthesize_scene}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(GENERATORS), default="matting")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    generate = GENERATORS[args.task]
    generate(0, args.size)  # warm up
    times = []
    for seed in range(args.samples):
        start = time.perf_counter()
        generate(seed, args.size)
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    p95 = times[int(0.95 * (len(times) - 1))]
    print(f"{args.task}: {args.size}² synthetic sample on one core of {platform.machine()}: "
          f"median {statistics.median(times):.1f} ms, p95 {p95:.1f} ms over {args.samples} "
          f"seeds; {provenance_line()}")


if __name__ == "__main__":
    main()
