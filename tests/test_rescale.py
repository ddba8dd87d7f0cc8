"""``kdkit predict --long-side``: the network sees each image at the asked size (area
averaging), and the prediction comes back at the image's own resolution."""

import cv2
import numpy as np
import torch
from torch import nn

from kdkit.cli import EXIT_BAD_INPUT, main
from kdkit.rescale import long_side_size
from tasks.matting.models import IMAGENET_MEAN, IMAGENET_STD
from tasks.matting.task import MattingTask
from tasks.segmentation.task import SegmentationTask

CPU = torch.device("cpu")


class Spy(nn.Module):
    """Records its inputs and answers a constant map of ``channels`` at their size."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.values, self.seen = values, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        out = torch.tensor(self.values).view(1, -1, 1, 1)
        return out.expand(x.shape[0], -1, *x.shape[-2:]).clone()


def _photo(tmp_path, height=48, width=64):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    trimap = np.full((height, width), 128, np.uint8)
    trimap[:, :10], trimap[:, -10:] = 0, 255
    trimap[0, 30] = 0  # a known pixel too small to survive the downscale
    cv2.imwrite(str(tmp_path / "photo.png"), image[..., ::-1])
    cv2.imwrite(str(tmp_path / "trimap.png"), trimap)
    return image, trimap


def test_long_side_size_keeps_the_aspect():
    assert long_side_size(440, 680, 160) == (104, 160)
    assert long_side_size(680, 440, 160) == (160, 104)
    assert long_side_size(10, 1000, 50) == (1, 50)


def test_matting_network_sees_the_block_mean_and_alpha_comes_back_full_size(tmp_path):
    image, trimap = _photo(tmp_path)
    spy = Spy([0.25])
    [path] = MattingTask().predict(spy, str(tmp_path / "photo.png"),
                                   str(tmp_path / "trimap.png"), str(tmp_path / "out"), {},
                                   CPU, long_side=32)
    [seen] = spy.seen
    assert seen.shape == (1, 4, 24, 32)
    blocks = image.reshape(24, 2, 32, 2, 3).astype(np.float64).mean(axis=(1, 3)) / 255
    expected = (blocks - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(seen[0, :3].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    alpha = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert alpha.shape == trimap.shape
    np.testing.assert_array_equal(alpha[trimap == 128], 64)  # round(0.25 · 255)
    np.testing.assert_array_equal(alpha[trimap == 0], 0)  # known pixels at full resolution
    np.testing.assert_array_equal(alpha[trimap == 255], 255)


def test_segmentation_scores_come_back_full_size(tmp_path):
    _photo(tmp_path)
    spy = Spy([0.0, 0.0, 0.0, 1.0])
    [path] = SegmentationTask().predict(spy, str(tmp_path / "photo.png"), None,
                                        str(tmp_path / "out"), {}, CPU, long_side=16)
    assert spy.seen[0].shape == (1, 3, 12, 16)
    labels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert labels.shape[:2] == (48, 64)
    assert len(np.unique(labels.reshape(-1, labels.shape[-1]), axis=0)) == 1  # class 3


def test_a_long_side_below_one_pixel_is_one_line(tmp_path, capsys):
    _photo(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("task: matting\nmodel: {name: dim_student}\nout_dir: runs/x\n")
    weights = tmp_path / "model.pt"
    torch.save({"model": MattingTask().build_model({}).state_dict()}, weights)
    assert main(["predict", str(config), "--checkpoint", str(weights), "--image",
                 str(tmp_path / "photo.png"), "--guide", str(tmp_path / "trimap.png"),
                 "--output", str(tmp_path / "out"), "--long-side", "0"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err == "kdkit predict: --long-side must be a positive number of pixels, found 0"


def test_the_full_size_gives_what_no_long_side_gives(tmp_path):
    _photo(tmp_path)
    torch.manual_seed(0)
    model = MattingTask().build_model({}).eval()
    alphas = []
    for long_side in (64, None):
        [path] = MattingTask().predict(model, str(tmp_path / "photo.png"),
                                       str(tmp_path / "trimap.png"),
                                       str(tmp_path / str(long_side)), {}, CPU, long_side)
        alphas.append(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))
    np.testing.assert_array_equal(alphas[0], alphas[1])
