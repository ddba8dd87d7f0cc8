"""The shipped teacher on a real photograph: the lemur figure in docs/matting.md.

    .venv/bin/python scripts/lemur_figure.py [--out docs/figures/lemur.jpg]

Runs the matting task's shipped CPU teacher (``tasks/matting/configs/tiny/teacher.yaml``
with ``tasks.matting.pretrained:tiny_teacher.safetensors``, as ``kdkit predict`` does) and
closed-form matting (pymatting, :mod:`tasks.matting.classical`) on the CC0 lemur photo in
``tests/fixtures/lemur`` (hand-drawn trimap, unknown value 102), writes the figure
photo | trimap | teacher | closed form, and prints the mean alpha of each in the trimap's
unknown band (``tests/test_lemur.py`` pins the closed-form value printed here).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from kdkit.checkpoint import load_weights
from kdkit.config import load_run_config
from kdkit.provenance import provenance_line
from kdkit.task import load_task
from kdkit.train import build_model
from tasks.matting.classical import classical_methods
from tasks.matting.data import read_image, read_trimap

LEMUR = Path("tests/fixtures/lemur")
UNKNOWN_VALUE = 102
CONFIG = "tasks/matting/configs/tiny/teacher.yaml"
WEIGHTS = "tasks.matting.pretrained:tiny_teacher.safetensors"


def lemur() -> tuple[np.ndarray, np.ndarray]:
    """(``H×W×3`` uint8 RGB photo, ``H×W`` uint8 trimap with 0 / 128 / 255)."""
    trimap = read_trimap(LEMUR / "lemur_trimap.png", UNKNOWN_VALUE)
    return read_image(LEMUR / "lemur.png"), np.where(trimap == UNKNOWN_VALUE, 128, trimap)


def teacher_matte(directory: Path) -> np.ndarray:
    """The shipped teacher's ``H×W`` alpha in [0, 1], through ``task.predict``."""
    run = load_run_config(CONFIG)
    task = load_task(run.task)
    model = load_weights(build_model(task, run.model), WEIGHTS).eval()
    data = {**run.data, "unknown_value": UNKNOWN_VALUE}
    [path] = task.predict(model, str(LEMUR / "lemur.png"), str(LEMUR / "lemur_trimap.png"),
                          str(directory), data, torch.device("cpu"))
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255


def closed_form_matte(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """Closed-form matting's ``H×W`` alpha in [0, 1] (the comparison's training-free row)."""
    batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
             "trimap": torch.from_numpy(trimap)[None, None].float()}
    return classical_methods()["closed_form"](batch)[0, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/lemur.jpg")
    args = parser.parse_args()
    image, trimap = lemur()
    unknown = trimap == 128
    teacher = teacher_matte(Path("runs/lemur"))
    start = time.perf_counter()
    closed = closed_form_matte(image, trimap)
    seconds = time.perf_counter() - start
    grey = [cv2.cvtColor(np.rint(a * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
            for a in (trimap / 255, teacher, closed)]
    sheet = np.concatenate([image, *grey], axis=1)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(provenance_line())
    print(f"wrote {args.out}: photo | trimap | shipped teacher | closed form")
    print(f"mean alpha in the unknown band ({unknown.sum()} px): teacher "
          f"{teacher[unknown].mean():.4f}, closed form {closed[unknown].mean():.4f} "
          f"({seconds:.1f} s)")


if __name__ == "__main__":
    main()
