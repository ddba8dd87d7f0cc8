"""The ``kdkit`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    from kdkit.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, size=args.size, batch=args.batch)
    return 0


def _bench_kernels(args: argparse.Namespace) -> int:
    import torch

    from kdkit import bench

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kdkit bench kernels: --device cuda was asked for, but no CUDA device is "
              "visible here; run with --device cpu", file=sys.stderr)
        return 2
    backends = args.backends or (
        ["reference", "factored", "triton"] if device.type == "cuda" else ["reference", "factored"]
    )
    batch = args.batch or (16 if device.type == "cuda" else 2)
    cases = bench.paper_cases(batch)
    if args.crops:
        cases = [c for c in cases if any(c.name.startswith(f"{crop}²") for crop in args.crops)]
    results, ceilings = bench.run_benchmarks(device, batch, args.repeats, backends,
                                             args.accumulate, cases)
    command = "kdkit bench kernels " + " ".join(sys.argv[3:] if args.argv is None else args.argv)
    md, csv_path = bench.write_report(results, ceilings, device, Path(args.out),
                                      command.strip(), batch)
    print(md.read_text())
    print(f"wrote {md} and {csv_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdkit", description="Knowledge distillation for dense prediction."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="distil a small timm student from a timm teacher on generated data"
    )
    demo.add_argument(
        "--steps", type=int, default=120, help="training steps per student (teacher: twice)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--size", type=int, default=64, help="image side in pixels")
    demo.add_argument("--batch", type=int, default=32)
    demo.set_defaults(run=_demo)

    bench = commands.add_parser("bench", help="micro-benchmarks")
    targets = bench.add_subparsers(dest="target", required=True, metavar="TARGET")
    kernels = targets.add_parser(
        "kernels", help="time the similarity backends at the papers' shapes, write a table"
    )
    kernels.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    kernels.add_argument("--batch", type=int, help="default: 16 on cuda, 2 on cpu")
    kernels.add_argument("--repeats", type=int, default=5, help="timed runs per measurement")
    kernels.add_argument("--backends", nargs="+", choices=["reference", "factored", "triton"])
    kernels.add_argument("--accumulate", nargs="+", choices=["fp32", "fp64"],
                         default=["fp32", "fp64"])
    kernels.add_argument("--crops", nargs="+", type=int, choices=[320, 640, 1024],
                         help="only these crop sizes (default: all)")
    kernels.add_argument("--out", default="docs/benchmarks", help="report folder")
    kernels.set_defaults(run=_bench_kernels, argv=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
