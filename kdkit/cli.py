"""The ``kdkit`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from kdkit.demo import run_demo

    run_demo(steps=args.steps, seed=args.seed, size=args.size, batch=args.batch)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
