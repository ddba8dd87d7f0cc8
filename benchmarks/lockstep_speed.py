"""Rows in lockstep against rows one after another: one comparison timed both ways.

    .venv/bin/python benchmarks/lockstep_speed.py [--config tasks/matting/configs/compare/tiny.yaml]
        [--out runs/bench/lockstep]

Runs ``kdkit compare CONFIG`` twice from empty folders, first with the rows of each seed
in lockstep (the default), then with ``--no-lockstep``, and prints a Markdown table: the
wall time of each whole comparison (training, evaluation and report), the ratio, and the
largest difference of any metric of any row between the two reports (0 when every row
trained alone equals the row trained in lockstep, as tests/test_lockstep.py checks on
weights). Prints the command, the machine and kdkit's provenance line. Run it alone on the
machine: timing under load is noise.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

from kdkit.compare import load_compare_config, run_compare
from kdkit.data import usable_cores
from kdkit.provenance import provenance_line
from kdkit.task import load_task

#: results.csv columns that are not quality metrics (timings may differ between the runs).
NOT_METRICS = {"method", "seed", "params", "gflops", "kept_params_pct", "kept_gflops_pct",
               "cpu_ms", "train_ms_per_step"}


def timed_compare(config_path: str, out: Path, lockstep: bool) -> tuple[float, Path]:
    """(seconds, report folder) of the comparison in ``config_path`` run from an empty
    ``out``, with the rows in lockstep or not."""
    shutil.rmtree(out, ignore_errors=True)
    config = load_compare_config(config_path, [f"out_dir={out}"])
    config.lockstep = lockstep
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the report's table, printed at the end
        report = run_compare(config, load_task(config.task), progress=False)
    return time.perf_counter() - start, report


def metrics(report: Path) -> dict[tuple[str, str, str], float]:
    """Every metric of every (method, seed) row of ``report``'s results.csv."""
    with open(report / "results.csv") as handle:
        return {(row["method"], row["seed"], column): float(row[column])
                for row in csv.DictReader(handle)
                for column, value in row.items() if column not in NOT_METRICS and value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tasks/matting/configs/compare/tiny.yaml")
    parser.add_argument("--out", default="runs/bench/lockstep")
    args = parser.parse_args()
    out = Path(args.out)
    lockstep_s, lockstep_report = timed_compare(args.config, out / "lockstep", True)
    sequential_s, sequential_report = timed_compare(args.config, out / "sequential", False)
    a, b = metrics(lockstep_report), metrics(sequential_report)
    if a.keys() != b.keys():
        sys.exit(f"the two reports have different rows or metrics: {sorted(a.keys() ^ b.keys())}")
    largest = max(abs(a[key] - b[key]) for key in a)
    print(f"`{shlex.join(['python', *sys.argv])}` on {platform.machine()} with "
          f"{usable_cores()} usable cores; {provenance_line()}\n")
    print("| rows | wall s (train, evaluate, report) | speed-up | largest metric difference |")
    print("|---|---|---|---|")
    print(f"| one after another (`--no-lockstep`) | {sequential_s:.1f} | 1.00× | |")
    print(f"| in lockstep | {lockstep_s:.1f} | {sequential_s / lockstep_s:.2f}× | "
          f"{largest:.3g} over {len(a)} values |")


if __name__ == "__main__":
    main()
