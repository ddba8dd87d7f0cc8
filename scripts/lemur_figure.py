"""The shipped teacher on a real photograph: the lemur figure in docs/matting.md.

    .venv/bin/python scripts/lemur_figure.py [--out docs/figures/lemur.jpg] [--long-side N]

Runs the matting task's shipped CPU teacher (``tasks/matting/configs/tiny/teacher.yaml``
with ``tasks.matting.pretrained:tiny_teacher.safetensors``, as ``kdkit predict`` does) and
closed-form matting (pymatting, :mod:`tasks.matting.classical`) on the CC0 lemur photo in
``tests/fixtures/lemur`` (hand-drawn trimap, unknown value 102), writes the figure
photo | trimap | teacher at full resolution | teacher at ``--long-side`` | closed form, and
prints the mean alpha in the trimap's unknown band of closed form and of the teacher at a
range of long sides (``tests/test_lemur.py`` pins the closed-form value printed here).
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
LONG_SIDE = 96  # the side of the teacher's training images (data.size)
SWEEP = (None, 96, 128, 160, 192, 256, 340)


def lemur() -> tuple[np.ndarray, np.ndarray]:
    """(``H×W×3`` uint8 RGB photo, ``H×W`` uint8 trimap with 0 / 128 / 255)."""
    trimap = read_trimap(LEMUR / "lemur_trimap.png", UNKNOWN_VALUE)
    return read_image(LEMUR / "lemur.png"), np.where(trimap == UNKNOWN_VALUE, 128, trimap)


def teacher_mattes(directory: Path, long_sides: list[int | None]) -> dict:
    """The shipped teacher's ``H×W`` alpha in [0, 1] at each of ``long_sides``, through
    ``task.predict`` (as ``kdkit predict --long-side``; ``None``: full resolution)."""
    run = load_run_config(CONFIG)
    task = load_task(run.task)
    model = load_weights(build_model(task, run.model), WEIGHTS).eval()
    data = {**run.data, "unknown_value": UNKNOWN_VALUE}
    mattes = {}
    for long_side in long_sides:
        [path] = task.predict(model, str(LEMUR / "lemur.png"),
                              str(LEMUR / "lemur_trimap.png"), str(directory / str(long_side)),
                              data, torch.device("cpu"), long_side)
        mattes[long_side] = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    return mattes


def closed_form_matte(image: np.ndarray, trimap: np.ndarray) -> np.ndarray:
    """Closed-form matting's ``H×W`` alpha in [0, 1] (the comparison's training-free row)."""
    batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255,
             "trimap": torch.from_numpy(trimap)[None, None].float()}
    return classical_methods()["closed_form"](batch)[0, 0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/figures/lemur.jpg")
    parser.add_argument("--long-side", type=int, default=LONG_SIDE,
                        help=f"the teacher's --long-side in the figure (default {LONG_SIDE})")
    args = parser.parse_args()
    image, trimap = lemur()
    unknown = trimap == 128
    teacher = teacher_mattes(Path("runs/lemur"), list(dict.fromkeys(
        [*SWEEP, args.long_side])))
    start = time.perf_counter()
    closed = closed_form_matte(image, trimap)
    seconds = time.perf_counter() - start
    grey = [cv2.cvtColor(np.rint(a * 255).astype(np.uint8), cv2.COLOR_GRAY2RGB)
            for a in (trimap / 255, teacher[None], teacher[args.long_side], closed)]
    sheet = np.concatenate([image, *grey], axis=1)
    cv2.imwrite(args.out, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    print(provenance_line())
    print(f"wrote {args.out}: photo | trimap | shipped teacher at full resolution | at "
          f"--long-side {args.long_side} | closed form")
    print(f"mean alpha in the unknown band ({unknown.sum()} px): closed form "
          f"{closed[unknown].mean():.4f} ({seconds:.1f} s); the shipped teacher at")
    for long_side in SWEEP:
        print(f"  --long-side {long_side or 'none (680)'}: "
              f"{teacher[long_side][unknown].mean():.4f}")


if __name__ == "__main__":
    main()
