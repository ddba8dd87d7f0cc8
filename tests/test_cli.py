import subprocess
import sys

import pytest

import kdkit.train
from kdkit.cli import main


def test_demo_runs_end_to_end_at_toy_scale(capsys):
    assert main(["demo", "--steps", "2", "--size", "32", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for line in ("teacher", "student alone", "student + KD", "held-out accuracy"):
        assert line in out


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "kdkit", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


def synth(out, *extra):
    return main(["data", "synth", "--task", "matting", "--out", str(out), "--n", "1",
                 "--size", "32", *extra])


def test_data_synth_refuses_a_folder_that_holds_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert synth(tmp_path) == 2
    err = capsys.readouterr().err
    assert "kdkit data synth: --out" in err and "is not empty (it holds notes.txt)" in err
    assert "--overwrite" in err and "another --out" in err
    assert synth(tmp_path, "--overwrite") == 2  # not samples: kept, even with --overwrite
    assert "also holds notes.txt" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_data_synth_overwrite_replaces_the_old_samples(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", "--task", "matting", "--out", str(out), "--n", "2",
                 "--size", "32"]) == 0
    assert synth(out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert len(list((out / "image").iterdir())) == 2
    assert synth(out, "--overwrite") == 0
    assert sorted(p.name for p in (out / "image").iterdir()) == ["00000.png"]
    assert (out / "contact_sheet.png").is_file()


def test_data_synth_needs_a_task_and_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["data", "synth", "--out", "x"])
    assert "--task" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--task", "matting", "--out", "x", "--n", "0"])
    assert "argument --n: expected an integer >= 1, found '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "synth", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--task TASK the task whose data to generate: matting, segmentation" in text
    for option in ("--out OUT the folder", "--overwrite delete", "--n N number",
                   "--size SIZE image side", "--seed SEED seed"):
        assert option in text


def test_predict_takes_guide_only_and_train_explains_no_resume(capsys):
    with pytest.raises(SystemExit):
        main(["predict", "c.yaml", "--checkpoint", "m.pt", "--image", "i", "--trimap", "t",
              "--output", "o"])
    assert "unrecognized arguments: --trimap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--no-resume start over: delete this run folder's checkpoint, weights and logs "
            "(log.jsonl, tensorboard/) first (needed when the config changed in more than the "
            "safe keys)") in text


def test_quiet_train_still_prints_the_final_metrics(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("task: matting\nmodel: {name: dim_student}\nout_dir: runs/x\n")
    calls = []

    def fake_train(run, task, resume, progress):
        calls.append(progress)
        return {"SAD": 12.5, "MSE": 0.25}

    monkeypatch.setattr(kdkit.train, "train", fake_train)
    assert main(["train", str(config), "--quiet"]) == 0
    assert calls == [False]
    assert capsys.readouterr().out.split() == ["SAD:", "12.5", "MSE:", "0.25"]
