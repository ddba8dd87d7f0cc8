"""The matting task end to end through the CLI: train, resume, evaluate, predict, distil."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from kdkit.checkpoint import load_checkpoint
from kdkit.cli import main
from kdkit.config import load_run_config
from kdkit.task import load_task

LEMUR = Path(__file__).resolve().parents[2] / "shared" / "data" / "lemur"

TINY = {
    "task": "matting",
    "out_dir": "unused",
    "model": {"name": "dim_student"},
    "data": {"kind": "synthetic", "train_length": 40, "test_length": 3, "size": 64,
             "crop_sizes": [48, 64], "output_size": 64},
    "loss": {"alpha": 0.5, "composition": 0.5},
    "train": {"steps": 20, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 10,
              "log_every": 5},
}


def write_config(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_train_resume_eval_predict(tmp_path, capsys):
    config = write_config(tmp_path / "student.yaml", TINY)
    run_dir = tmp_path / "student"
    constant = ["--set", "train.schedule=constant"]  # steps may grow on resume only then
    assert main(["train", config, "--out", str(run_dir), "--quiet",
                 "--set", "train.steps=10", "train.schedule=constant"]) == 0
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 10
    assert main(["train", config, "--out", str(run_dir), "--quiet", *constant]) == 0  # at 10
    assert "resuming" not in capsys.readouterr().out  # quiet
    train_log = records(run_dir, "train")
    assert [r["step"] for r in train_log] == [5, 10, 15, 20]
    assert {"alpha", "composition", "total", "ms_per_step"} <= set(train_log[-1])
    final = records(run_dir, "eval")[-1]
    assert final["step"] == 20 and {"SAD", "MSE", "Grad", "Conn"} <= set(final)
    assert load_checkpoint(run_dir / "checkpoint.pt")["step"] == 20

    assert main(["eval", config, "--checkpoint", str(run_dir / "model.pt"), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"SAD: {final['SAD']:.6g}" in printed

    folder = tmp_path / "synth"
    assert main(["data", "synth", "--task", "matting", "--out", str(folder), "--n", "2",
                 "--size", "64"]) == 0
    out = tmp_path / "pred"
    assert main(["predict", config, "--checkpoint", str(run_dir / "model.pt"),
                 "--image", str(folder / "image"), "--guide", str(folder / "trimap"),
                 "--output", str(out)]) == 0
    written = sorted(out.glob("*.png"))
    assert [p.name for p in written] == ["00000.png", "00001.png"]
    alpha = cv2.imread(str(written[0]), cv2.IMREAD_UNCHANGED)
    trimap = cv2.imread(str(folder / "trimap" / "00000.png"), cv2.IMREAD_UNCHANGED)
    assert alpha.shape == (64, 64) and alpha.dtype == np.uint8
    assert (alpha[trimap == 0] == 0).all() and (alpha[trimap == 255] == 255).all()


@pytest.mark.skipif(not (LEMUR / "lemur.png").exists(), reason="shared/data/lemur not present")
def test_predict_on_a_real_photo_with_its_own_trimap_convention(tmp_path):
    config = write_config(tmp_path / "s.yaml", {**TINY, "out_dir": str(tmp_path / "run")})
    task = load_task("matting")
    run = load_run_config(config)
    weights = tmp_path / "model.pt"
    import torch

    torch.save({"model": task.build_model(run.model).state_dict()}, weights)
    out = tmp_path / "pred"
    with pytest.raises(ValueError, match="--set data.unknown_value=102"):
        main(["--debug", "predict", config, "--checkpoint", str(weights), "--image",
              str(LEMUR / "lemur.png"), "--guide", str(LEMUR / "lemur_trimap.png"),
              "--output", str(out)])
    assert main(["predict", config, "--set", "data.unknown_value=102", "--checkpoint",
                 str(weights), "--image", str(LEMUR / "lemur.png"), "--guide",
                 str(LEMUR / "lemur_trimap.png"), "--output", str(out)]) == 0
    alpha = cv2.imread(str(out / "lemur.png"), cv2.IMREAD_UNCHANGED)
    assert alpha.shape == (440, 680)


def test_distillation_run_with_teacher_checkpoint(tmp_path):
    teacher_cfg = {**TINY, "model": {"name": "dim_teacher"},
                   "train": {**TINY["train"], "steps": 2, "batch_size": 2}}
    config = write_config(tmp_path / "teacher.yaml", teacher_cfg)
    assert main(["train", config, "--out", str(tmp_path / "teacher"), "--quiet"]) == 0
    student_cfg = {
        **TINY,
        "model": {"name": "dim_student", "adapters": True},
        "loss": {"alpha": 0.5, "teacher_alpha": 0.5},
        "teacher": {"model": {"name": "dim_teacher"},
                    "checkpoint": str(tmp_path / "teacher" / "model.pt")},
        "distillation": [
            {"loss": "spatial_channel_similarity", "student": f"conv{k}.adapter",
             "teacher": f"conv{k}.out", "name": f"spatial+channel:conv{k}"}
            for k in (2, 3, 4, 5)
        ],
        "train": {**TINY["train"], "steps": 3, "batch_size": 2, "log_every": 1},
    }
    config = write_config(tmp_path / "kd.yaml", student_cfg)
    assert main(["train", config, "--out", str(tmp_path / "kd"), "--quiet"]) == 0
    last = records(tmp_path / "kd", "train")[-1]
    assert {"alpha", "teacher_alpha", "spatial+channel:conv2", "spatial+channel:conv5"} <= set(
        last)
    parts = sum(v for k, v in last.items() if k not in ("step", "total", "lr", "kind",
                                                        "ms_per_step", "task_loss"))
    assert last["total"] == pytest.approx(parts, rel=1e-5)

    hinton_cfg = {key: value for key, value in student_cfg.items() if key != "distillation"}
    config = write_config(tmp_path / "hinton.yaml", hinton_cfg)  # teacher alpha, no features
    assert main(["train", config, "--out", str(tmp_path / "hinton"), "--quiet"]) == 0
    last = records(tmp_path / "hinton", "train")[-1]
    assert last["teacher_alpha"] > 0 and last["total"] == pytest.approx(
        last["alpha"] + last["teacher_alpha"], rel=1e-5)


def test_config_errors_are_clear(tmp_path):
    bad = {**TINY, "loss": {"alpha": 1.0, "composite": 0.5}}
    config = write_config(tmp_path / "bad.yaml", bad)
    with pytest.raises(ValueError, match="unknown key 'composite'.*'composition'"):
        main(["--debug", "train", config, "--out", str(tmp_path / "x"), "--quiet"])
    with pytest.raises(ValueError, match="unknown task 'mating'.*'matting'"):
        load_task("mating")
