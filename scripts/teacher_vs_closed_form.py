"""Where closed-form matting beats the shipped CPU teacher: SAD of both per source of the
synthetic composites (the background photo; a photo or a procedural texture for the body's
colour), on the test split and, for contrast, on the training split.

    .venv/bin/python scripts/teacher_vs_closed_form.py [--n 100] [--size 96]

Samples ``0 .. n-1`` of each split at ``--size`` (the cpu preset's test images are the test
split's first 100 at 96²), with their evaluation trimaps; the teacher's known regions are
taken from the trimap as in evaluation. Prints one line per group: composites, mean SAD
(sum ÷ 1000) of the teacher and of closed form, and their ratio; then, per split, the mean
true alpha in the unknown band (the prior a network learns from these data). docs/matting.md
quotes it.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from kdkit.checkpoint import load_weights
from kdkit.config import load_run_config
from kdkit.data import split_seed
from kdkit.provenance import provenance_line
from kdkit.task import load_task
from kdkit.train import build_model
from tasks.matting.classical import classical_methods
from tasks.matting.data.synthetic import PROCEDURAL, synthesize
from tasks.matting.data.trimaps import DEFAULT_UNKNOWN
from tasks.matting.models import network_input
from tasks.matting.task import with_known_regions

CONFIG = "tasks/matting/configs/tiny/teacher.yaml"
WEIGHTS = "tasks.matting.pretrained:tiny_teacher.safetensors"


def sad_pair(model, closed_form, sample: dict) -> tuple[float, float]:
    """(teacher SAD, closed-form SAD) of one sample, each sum |alpha − truth| ÷ 1000."""
    image = torch.from_numpy(sample["image"]).permute(2, 0, 1)[None].float() / 255
    trimap = torch.from_numpy(sample["trimap"])[None, None].float()
    with torch.no_grad():
        teacher = with_known_regions(model(network_input(image, trimap)), trimap)
    classical = closed_form({"image": image, "trimap": trimap})
    truth = sample["alpha"]
    return tuple(float(np.abs(a[0, 0].numpy() - truth).sum()) / 1000
                 for a in (teacher, classical))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100, help="composites per split")
    parser.add_argument("--size", type=int, default=96, help="their side in pixels")
    args = parser.parse_args()
    run = load_run_config(CONFIG)
    model = load_weights(build_model(load_task(run.task), run.model), WEIGHTS).eval()
    closed_form = classical_methods()["closed_form"]
    sums = defaultdict(lambda: np.zeros(3))  # (split, group) → [count, teacher, closed form]
    band_means = defaultdict(list)  # split → each composite's mean true alpha in its band
    for split in ("test", "train"):
        for index in range(args.n):
            sample = synthesize(split_seed(split, index), args.size)
            band_means[split].append(sample["alpha"][sample["trimap"] == DEFAULT_UNKNOWN].mean())
            teacher, classical = sad_pair(model, closed_form, sample)
            body = "body: texture" if sample["fg_source"] == PROCEDURAL else "body: photo"
            for group in ("all", body, f"background: {sample['bg_source']}"):
                sums[split, group] += (1, teacher, classical)
    print(provenance_line())
    for (split, group), (count, teacher, classical) in sums.items():
        print(f"{split:5s}  {group:34s} {int(count):4d}  teacher {teacher / count:.3f}  "
              f"closed form {classical / count:.3f}  ratio {teacher / classical:.2f}")
    for split, means in band_means.items():
        print(f"{split:5s}  true alpha in the unknown band: mean {np.mean(means):.2f}, "
              f"99th percentile of the composites' means {np.percentile(means, 99):.2f}")


if __name__ == "__main__":
    main()
