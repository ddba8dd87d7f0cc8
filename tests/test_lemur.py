"""The shipped matting teacher on a real photograph (issue 15): ``kdkit predict`` on the CC0
lemur photo in tests/fixtures/lemur, whose hand-drawn trimap's unknown band (value 102) is
mostly fur, i.e. mostly foreground."""

import cv2
import pytest

from kdkit.cli import main

LEMUR = "tests/fixtures/lemur"
#: Closed-form matting's mean alpha in the unknown band (38,666 px), printed by
#: ``python scripts/lemur_figure.py`` (pymatting 1.1.16's estimate_alpha_cf, its defaults).
CLOSED_FORM_MEAN = 0.6277
#: How far the shipped teacher's mean may be from it (issue 15's target).
TOLERANCE = 0.15
#: The photo is shown to the teacher at the side of its training images (data.size).
LONG_SIDE = "96"


@pytest.mark.xfail(strict=True, reason="issue 15, open: the shipped teacher's mean is 0.37 "
                   "at --long-side 96 and 0.17 at full resolution (it calls much of the fur "
                   "background); remove this mark when a teacher meets it")
def test_shipped_teacher_sees_the_lemurs_fur_as_foreground(tmp_path):
    code = main(["predict", "tasks/matting/configs/tiny/teacher.yaml", "--checkpoint",
                 "tasks.matting.pretrained:tiny_teacher.safetensors", "--image",
                 f"{LEMUR}/lemur.png", "--guide", f"{LEMUR}/lemur_trimap.png", "--output",
                 str(tmp_path), "--set", "data.unknown_value=102", "--long-side", LONG_SIDE,
                 "--quiet"])
    assert code == 0
    alpha = cv2.imread(str(tmp_path / "lemur.png"), cv2.IMREAD_GRAYSCALE) / 255
    trimap = cv2.imread(f"{LEMUR}/lemur_trimap.png", cv2.IMREAD_UNCHANGED)[..., 0]
    unknown = trimap == 102
    assert unknown.sum() == 38_666
    assert abs(alpha[unknown].mean() - CLOSED_FORM_MEAN) <= TOLERANCE
