"""What the command line prints for errors a user can fix: one line on stderr and an exit
status (2: bad input, 1: a run that failed), or the traceback with ``--debug``."""

import subprocess
import sys

import pytest
import torch

import kdkit.train
from kdkit.cli import EXIT_BAD_INPUT, EXIT_RUN_FAILED, build_parser, main
from kdkit.data import imread, index_images
from kdkit.errors import ConfigError, DataError, KernelFailure, NonFiniteLossError
from tasks.matting.task import MattingTask
from tasks.segmentation.task import SegmentationTask

RUN = "task: matting\nmodel: {name: dim_student}\nout_dir: runs/x\n"


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN)
    return str(path)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def test_a_config_error_is_one_line_naming_the_key_and_exits_2(config, capsys):
    assert main(["train", config, "--set", "train.steps=-5"]) == EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert line.startswith("kdkit train: train.steps: expected a number >= 1, found -5")


@pytest.mark.parametrize("argv", [["--debug", "train"], ["train", "--debug"]])
def test_debug_before_or_after_the_command_raises_with_the_traceback(config, argv):
    with pytest.raises(ConfigError, match="train.steps"):
        main([*argv, config, "--set", "train.steps=0"])


@pytest.mark.parametrize("command", [["train", "c.yaml"], ["compare", "c.yaml"],
                                     ["bench", "kernels"], ["data", "synth", "--task", "m",
                                                            "--out", "o"]])
def test_every_command_takes_debug_after_its_name(command):
    assert build_parser().parse_args([*command, "--debug"]).debug is True
    assert build_parser().parse_args(command).debug is False


@pytest.mark.parametrize("error, status", [
    (NonFiniteLossError("loss 'alpha' became NaN at step 3"), EXIT_RUN_FAILED),
    (KernelFailure("the triton kernel failed"), EXIT_RUN_FAILED),
    (ConfigError("loss.alpha: bad"), EXIT_BAD_INPUT),
])
def test_a_failed_run_exits_1_and_bad_input_2(config, capsys, monkeypatch, error, status):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(kdkit.train, "train", fail)
    assert main(["train", config, "--quiet"]) == status
    assert one_line(capsys.readouterr().err) == f"kdkit train: {error}"


def test_other_exceptions_keep_their_traceback(config, monkeypatch):
    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(kdkit.train, "train", bug)
    with pytest.raises(ZeroDivisionError):
        main(["train", config])


def test_the_installed_command_prints_one_line_for_a_missing_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "kdkit", "train", str(tmp_path / "no.yaml")],
                            capture_output=True, text=True)
    assert result.returncode == EXIT_BAD_INPUT
    assert one_line(result.stderr) == f"kdkit train: config file not found: {tmp_path}/no.yaml"


def test_an_unknown_task_lists_the_registered_ones(tmp_path, capsys):
    assert main(["data", "synth", "--task", "mating", "--out", str(tmp_path)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith("kdkit data synth: unknown task 'mating'. Did you mean 'matting'?")
    assert "matting, segmentation" in line


@pytest.mark.parametrize("task, kinds", [
    (MattingTask(), "synthetic, folder, composition1k"),
    (SegmentationTask(), "synthetic, folder"),
])
def test_a_typo_in_data_kind_names_the_valid_kinds(task, kinds):
    with pytest.raises(ConfigError, match=r"data.kind: unknown kind 'synthtic'. Did you mean "
                                          rf"'synthetic'\? Valid values: {kinds}$"):
        task.datasets({"kind": "synthtic"})


def test_task_sections_are_range_checked():
    with pytest.raises(ConfigError, match=r"data.unknown_value: .*<= 254, found 300"):
        MattingTask().datasets({"unknown_value": 300})
    with pytest.raises(ConfigError, match=r"model.name: unknown name 'dim_studnet'"):
        MattingTask().build_model({"name": "dim_studnet"})
    with pytest.raises(ConfigError, match=r"model.classes: expected a number >= 2, found 1"):
        SegmentationTask().build_model({"classes": 1})


def test_data_errors_are_kdkit_errors_and_a_missing_file_still_a_file_not_found(tmp_path):
    with pytest.raises(DataError, match="absent.png does not exist") as error:
        imread(tmp_path / "absent.png")
    assert isinstance(error.value, FileNotFoundError)
    (tmp_path / "image").mkdir()
    with pytest.raises(DataError, match="no images"):
        index_images(tmp_path, "mask")


def test_predict_with_a_missing_image_is_one_line(tmp_path, config, capsys):
    weights = tmp_path / "model.pt"
    torch.save({"model": MattingTask().build_model({}).state_dict()}, weights)
    assert main(["predict", config, "--checkpoint", str(weights), "--image",
                 str(tmp_path / "photo.png"), "--guide", str(tmp_path / "trimap.png"),
                 "--output", str(tmp_path / "out")]) == EXIT_BAD_INPUT
    line = one_line(capsys.readouterr().err)
    assert line == f"kdkit predict: no such image file or folder: {tmp_path}/photo.png"
