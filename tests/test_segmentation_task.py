"""The segmentation task end to end on the CPU: its compare preset with every method
(shrunk to a few steps), and train → eval → predict on a folder dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from kdkit.checkpoint import load_weights
from kdkit.cli import main
from kdkit.data import read_image
from kdkit.report import verdicts
from kdkit.task import load_task
from kdkit.train import build_model, read_log
from tasks.segmentation.data import read_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tasks/segmentation/configs/compare/tiny.yaml"
SMALL = ["base.train.steps=4", "base.train.log_every=2",
         "base.train.batch_size=4", "base.data.test_length=3", "base.data.size=64",
         "base.data.crop_size=48", "report.latency_size=[64,64]"]


def test_tiny_preset_runs_every_method_and_reports_miou_higher_is_better(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", str(TINY), "--quiet", "--set", f"out_dir={out}", *SMALL]) == 0
    report = out / "report"
    for name in ("results.csv", "results.md", "metrics.png", "curves.png", "examples.png"):
        assert (report / name).stat().st_size > 0, name
    with open(report / "results.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["teacher", "student", "hinton", "at", "ofd", "spatial", "channel",
                          "spatial+channel", "fitnet", "cwd", "dist", "mgd", "pairwise",
                          "cross-image", "ns", "dcp-spkd"]
    table = (report / "results.md").read_text()
    for row in rows.values():
        assert 0 <= float(row["mIoU"]) <= 1 and 0 <= float(row["pixel_acc"]) <= 1
    assert int(rows["teacher"]["params"]) == 1_734_790
    assert float(rows["teacher"]["cpu_ms"]) > 0 and "CPU ms @64²" in table
    assert int(rows["student"]["params"]) == 771_622
    for pruned in ("ns", "dcp-spkd"):  # half of each part removed from the teacher's width
        assert int(rows[pruned]["params"]) < 0.35 * 1_734_790
        run = yaml.safe_load((out / pruned / "seed0" / "config.yaml").read_text())
        summary = json.loads(Path(run["model"]["pruned"]).with_suffix(".json").read_text())
        assert summary["parameters"]["after"] == int(rows[pruned]["params"])
    assert "ΔmIoU vs student [95% CI]" in table and "higher is better" in table
    # every distillation term was trained and logged under its own name
    logged = {method: set(read_log(out / method / "seed0", "train")[0])
              for method in ("hinton", "at", "ofd", "spatial", "channel", "spatial+channel",
                             "fitnet", "cwd", "dist", "mgd", "pairwise", "cross-image")}
    assert any(key.startswith("hinton") for key in logged["hinton"])
    assert sum(key.startswith("ofd") for key in logged["ofd"]) == 4
    assert sum(key.startswith("spatial_channel") for key in logged["spatial+channel"]) == 4
    assert sum(key.startswith("fitnet") for key in logged["fitnet"]) == 4
    for method, loss in (("cwd", "cwd"), ("dist", "dist"), ("mgd", "mgd"),
                         ("pairwise", "pairwise_affinity"),
                         ("cross-image", "cross_image_affinity")):
        assert any(key.startswith(loss) for key in logged[method]), (method, logged[method])


def test_verdicts_follow_the_metric_direction():
    intervals = {"up": (0.1, 0.05, 0.2), "down": (-0.1, -0.2, -0.05), "flat": (0, -1, 1)}
    assert verdicts(intervals, "higher") == (["up"], ["down"], ["flat"])
    assert verdicts(intervals, "lower") == (["down"], ["up"], ["flat"])


def _folders(tmp_path: Path) -> tuple[Path, Path]:
    train, test = tmp_path / "train", tmp_path / "test"
    assert main(["data", "synth", "--task", "segmentation", "--out", str(train), "--n", "8",
                 "--size", "64"]) == 0
    assert main(["data", "synth", "--task", "segmentation", "--out", str(test), "--n", "3",
                 "--size", "48", "--seed", "100"]) == 0
    return train, test


def test_train_eval_predict_on_folders(tmp_path, capsys):
    train, test = _folders(tmp_path)
    config = {
        "task": "segmentation", "out_dir": str(tmp_path / "run"),
        "model": {"encoder": "resnet18", "encoder_args": {"channels": [8, 8, 16, 16]},
                  "decoder_channels": 8, "classes": 6},
        "data": {"kind": "folder", "classes": 6, "root": str(train), "test_root": str(test),
                 "crop_size": 32},
        "metrics": {"classes": 6},
        "train": {"steps": 3, "batch_size": 4, "log_every": 1},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--quiet"]) == 0
    weights = tmp_path / "run" / "model.pt"
    capsys.readouterr()
    assert main(["eval", str(path), "--checkpoint", str(weights), "--quiet"]) == 0
    printed = capsys.readouterr().out
    final = read_log(tmp_path / "run", "eval")[-1]
    assert f"{final['mIoU']:.6g}" in printed  # eval reproduces the run's final evaluation

    out = tmp_path / "pred"
    assert main(["predict", str(path), "--checkpoint", str(weights), "--image",
                 str(test / "image"), "--output", str(out)]) == 0
    task = load_task("segmentation")
    model = load_weights(build_model(task, config["model"]), weights).eval()
    for image_path in sorted((test / "image").iterdir()):
        labels = read_mask(out / image_path.name, classes=6)
        image = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            expected = model(image).argmax(1)[0].numpy()
        np.testing.assert_array_equal(labels, expected)


def test_predict_refuses_a_guide(tmp_path):
    task = load_task("segmentation")
    with pytest.raises(ValueError, match="no per-image guide"):
        task.predict(None, "x", "trimaps/", str(tmp_path), {}, torch.device("cpu"))


def test_the_segmentation_package_imports_nothing_from_matting():
    for path in (ROOT / "tasks/segmentation").rglob("*.py"):
        assert "tasks.matting" not in path.read_text(), path
