"""SPKD's training overhead on full-size DIM: a distillation step over a plain one.

    .venv/bin/python benchmarks/training_overhead.py [--sizes 128 64] [--batch 4]
        [--steps 10] [--device cpu]

For each crop size, the median milliseconds of
  plain:  the teacher's forward (no grad) + the student's forward, backward and Adam step;
  spatial+channel: the same through the Distiller with the SPKD paper's best row
          (spatial+channel similarity on conv2-5, the student's 1×1 adapters to the
          teacher's widths), the default backend and precision;
and the overhead, spatial+channel / plain − 1. The task loss is an L1 against a fixed
target (its cost is the same in both). Prints a Markdown table with the command, the
machine and kdkit's provenance line. Run it alone on the machine: timing under load is
noise.
"""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from kdkit import Distiller, DistillTerm
from kdkit.bench import median_ms
from kdkit.provenance import provenance_line
from kdkit.task import load_task

LAYERS = ("conv2", "conv3", "conv4", "conv5")
TERMS = [DistillTerm("spatial_channel_similarity", student=f"{layer}.adapter",
                     teacher=f"{layer}.out") for layer in LAYERS]


def _models(device: torch.device):
    task = load_task("matting")
    torch.manual_seed(0)
    teacher = task.build_model({"name": "dim_teacher"}).to(device).eval()
    student = task.build_model({"name": "dim_student", "adapters": True}).to(device).train()
    return teacher.requires_grad_(False), student


def _plain_step(teacher, student, optimizer, inputs, target):
    def step():
        with torch.no_grad():
            teacher(inputs)
        loss = (student(inputs) - target).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def _distillation_step(distiller, optimizer, inputs, target):
    def step():
        out = distiller(inputs)
        loss = (out.student_output - target).abs().mean() + out.losses["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def measure(size: int, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(plain ms, spatial+channel ms) per step at ``size``² crops."""
    teacher, student = _models(device)
    generator = torch.Generator().manual_seed(size)
    inputs = torch.rand(batch, 4, size, size, generator=generator).to(device)
    target = torch.rand(batch, 1, size, size, generator=generator).to(device)
    plain_step = _plain_step(teacher, student, torch.optim.Adam(student.parameters()),
                             inputs, target)
    plain_step()  # a second warm-up beside median_ms's own: Adam's state is made here
    plain = median_ms(plain_step, device, steps)
    distiller = Distiller(teacher, student, TERMS, example_inputs=inputs[:2]).train()
    optimizer = torch.optim.Adam(distiller.trainable_parameters())
    spkd_step = _distillation_step(distiller, optimizer, inputs, target)
    spkd_step()
    spkd = median_ms(spkd_step, device, steps)
    return plain, spkd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for size in args.sizes:
        plain, spkd = measure(size, args.batch, args.steps, device)
        rows.append(f"| {size}² | {plain:.1f} | {spkd:.1f} | {100 * (spkd / plain - 1):+.1f}% |")
        print(rows[-1], file=sys.stderr)
    command = "python " + " ".join(["benchmarks/training_overhead.py", *sys.argv[1:]])
    print("\n".join([
        f"Made by `{command}` on {platform.machine()} {device.type}, "
        f"{torch.get_num_threads()} threads; batch {args.batch}, median of {args.steps} steps; "
        f"{provenance_line()}",
        "",
        "| crop | plain ms (teacher fwd + student step) | spatial+channel conv2-5 ms | "
        "overhead |",
        "|---|---:|---:|---:|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
