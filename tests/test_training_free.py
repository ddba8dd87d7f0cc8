"""Training-free rows of a comparison: the task's classical methods evaluated per image
like the models, never trained, cached, marked in the report; and matting's closed-form
and KNN matting (pymatting) on a case with a known answer."""

import csv

import numpy as np
import pytest
import torch
from test_budget import toy_compare
from toy_task import MeanColour

from kdkit.cli import main
from kdkit.compare import load_compare_config, run_compare
from kdkit.errors import ConfigError
from kdkit.evaluation_cache import training_free_methods
from kdkit.task import load_task

METHODS = {"student": {}, "mean": {"training_free": "mean_colour"}}


def _ramp_batch(height=12, width=24):
    """Constant foreground and background colours mixed by a horizontal linear alpha ramp
    from 0 (column 3) to 1 (column ``width`` − 4); the trimap's outer four columns on each
    side known, as 0 and 1 truly are there. (batch, true alpha H×W)."""
    ramp = np.clip((np.arange(width) - 3) / (width - 7), 0, 1)
    alpha = np.tile(ramp, (height, 1))
    fg, bg = np.array([0.9, 0.3, 0.2]), np.array([0.1, 0.5, 0.8])
    image = alpha[..., None] * fg + (1 - alpha[..., None]) * bg
    trimap = np.full((height, width), 128.0)
    trimap[:, :4], trimap[:, -4:] = 0, 255
    batch = {"image": torch.from_numpy(image).permute(2, 0, 1)[None].float(),
             "trimap": torch.from_numpy(trimap)[None, None].float()}
    return batch, alpha


def test_closed_form_matting_recovers_a_linear_ramp_between_two_colours():
    # the colour-line model holds exactly here, so closed-form matting's solution is the
    # ramp itself, up to the solver's tolerance and float32 images: within 0.01 per pixel
    batch, alpha = _ramp_batch()
    predict = load_task("matting").training_free()["closed_form"]
    prediction = predict(batch)
    assert prediction.shape == (1, 1, *alpha.shape)
    assert np.abs(prediction[0, 0].numpy() - alpha).max() < 0.01
    assert "pymatting" in predict.version


def test_the_matting_task_offers_closed_form_and_knn_and_segmentation_none():
    assert set(training_free_methods(load_task("matting"))) == {"closed_form", "knn"}
    assert training_free_methods(load_task("segmentation")) == {}


def test_training_free_rows_are_reported_paired_and_cached(tmp_path):
    path = toy_compare(tmp_path, methods=METHODS, task="toy_task:TrainingFreeToyTask")
    calls = MeanColour.calls
    assert main(["compare", str(path), "--quiet"]) == 0
    assert MeanColour.calls == calls + 4  # once per test image, not per seed
    report = tmp_path / "cmp" / "report"
    with open(report / "results.csv") as handle:
        rows = {(r["method"], r["seed"]): r for r in csv.DictReader(handle)}
    for seed in ("0", "1"):  # one per seed: each seed's baseline is paired with it
        row = rows[("mean", seed)]
        assert row["training_free"] == "yes" and float(row["metric"]) == 0.0
        assert row["params"] == row["gflops"] == row["train_ms_per_step"] == ""
        assert float(row["cpu_s_per_image"]) > 0
        assert rows[("student", seed)]["training_free"] == ""
    table = (report / "results.md").read_text()
    assert "| mean (training-free) |" in table and "training-free CPU s/image" in table
    assert "(n = 1)" in table.split("| mean (training-free) |")[1].splitlines()[0]
    assert "Better metric than `student` (lower is better), interval excluding 0: mean" \
        in table
    assert not (tmp_path / "cmp" / "mean").exists()  # never trained

    assert main(["compare", str(path), "--quiet"]) == 0  # the second run reads the cache
    assert MeanColour.calls == calls + 4


def test_an_unknown_training_free_method_lists_the_tasks_methods(tmp_path):
    methods = {"student": {}, "mean": {"training_free": "median_colour"}}
    path = toy_compare(tmp_path, methods=methods, task="toy_task:TrainingFreeToyTask")
    config = load_compare_config(path)
    with pytest.raises(ConfigError, match="no training-free method 'median_colour'.*"
                                          "mean_colour"):
        run_compare(config, load_task("toy_task:TrainingFreeToyTask"), progress=False)
    assert not (tmp_path / "cmp" / "student").exists()  # refused before any training


def test_a_training_free_method_takes_no_overrides_and_is_no_baseline(tmp_path):
    extra = {"student": {}, "mean": {"training_free": "mean_colour", "loss": {}}}
    with pytest.raises(ConfigError, match="takes only 'training_free: <name>'"):
        load_compare_config(toy_compare(tmp_path, methods=extra))
    with pytest.raises(ConfigError, match="baseline 'mean' is training-free"):
        load_compare_config(toy_compare(tmp_path, methods=METHODS, baseline="mean"))
