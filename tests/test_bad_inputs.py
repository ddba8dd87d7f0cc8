"""The catalogue of bad inputs: each fails early with a message that says what was
expected, what was found and what to do (docs/errors.md lists them)."""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from toy_task import ToyNet

from kdkit import Distiller, DistillTerm
from kdkit.capture import UnknownModuleError
from kdkit.config import ConfigError, load_run_config
from kdkit.data import read_image
from kdkit.losses import batch_similarity_loss
from tasks.matting.data import EvalTransform, read_trimap
from tasks.matting.models import DIM, DIMSpec
from tasks.segmentation.models import SegmentationFPN

SPEC = DIMSpec(((4,), (8,), (8,), (8,), (8,)), (8, 8, 8, 4, 1))


def test_unknown_module_name_lists_close_names():
    with pytest.raises(UnknownModuleError, match=r"term 'spatial_similarity.*no submodule "
                                                  r"named 'bdy'.*closest valid names: body"):
        Distiller(ToyNet(8), ToyNet(4), [DistillTerm("spatial_similarity", student="bdy",
                                                     teacher="body")])


def test_mismatched_feature_shapes_name_the_term_and_the_fix():
    term = DistillTerm("channel_similarity", student="body", teacher="body")
    with pytest.raises(ValueError, match=r"term 'channel_similarity.*number of channels.*"
                                         r"adapter"):
        Distiller(ToyNet(8), ToyNet(4), [term], example_inputs=torch.rand(2, 3, 8, 8))


def test_teacher_and_student_on_different_devices():
    teacher = ToyNet(8).to("meta")
    with pytest.raises(ValueError, match=r"teacher is on \['meta'\] but the student on "
                                         r"\['cpu'\]; move both to one device"):
        Distiller(teacher, ToyNet(4), [DistillTerm("spatial_similarity", student="body",
                                                   teacher="body")])


def test_a_batch_of_one_for_batch_similarity():
    with pytest.raises(ValueError, match="at least 2 samples, found a batch of 1"):
        batch_similarity_loss(torch.rand(1, 4, 3, 3), torch.rand(1, 8, 3, 3))


def test_empty_unknown_region_at_evaluation():
    sample = {"image": np.zeros((8, 8, 3), np.uint8), "alpha": np.zeros((8, 8), np.float32),
              "trimap": np.zeros((8, 8), np.uint8), "name": "all_background"}
    with pytest.raises(ValueError, match="all_background: its trimap has no unknown pixels"):
        EvalTransform()(sample)


def test_trimap_with_unexpected_values_suggests_the_unknown_value(tmp_path):
    path = tmp_path / "trimap.png"
    trimap = np.zeros((8, 8), np.uint8)
    trimap[2:4] = 127
    trimap[4:] = 255
    cv2.imwrite(str(path), trimap)
    with pytest.raises(ValueError, match=re.escape(str(path)) + r".*values \{127\}.*"
                                         r"unknown_value=127"):
        read_trimap(path)


def test_missing_and_corrupt_image_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"could not decode image file .*corrupt.png"):
        read_image(corrupt)


def test_wrong_input_channel_count():
    with pytest.raises(ValueError, match=r"DIM takes B×4×H×W inputs.*network_input.*"
                                         r"\(1, 3, 32, 32\)"):
        DIM(SPEC)(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"B×3×H×W images, got shape \(1, 4, 32, 32\)"):
        SegmentationFPN("resnet18", 3, 8, {"channels": [8, 8, 8, 8]})(torch.rand(1, 4, 32, 32))


def test_unknown_config_key_suggests_the_right_one(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"task": "matting", "model": {}, "out_dir": "x",
                                    "trian": {"steps": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key 'trian'. Did you mean 'train'\?"):
        load_run_config(Path(path))
    path.write_text(yaml.safe_dump({"task": "matting", "model": {}, "out_dir": "x",
                                    "train": {"step": 3}}))
    with pytest.raises(ConfigError, match=r"train: unknown key 'step'. Did you mean 'steps'"):
        load_run_config(Path(path))
