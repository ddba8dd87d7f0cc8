"""The Laplacian loss against OpenCV's image pyramids (float64) and hand-made cases."""

import cv2
import numpy as np
import pytest
import torch

from tasks.matting.losses import laplacian_loss, laplacian_pyramid
from tasks.matting.task import MattingTask


def opencv_bands(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """OpenCV's Laplacian pyramid: ``G_i − pyrUp(pyrDown(G_i))``, reflected borders."""
    bands = []
    for _ in range(levels):
        down = cv2.pyrDown(image, borderType=cv2.BORDER_REFLECT_101)
        up = cv2.pyrUp(down, dstsize=image.shape[::-1], borderType=cv2.BORDER_REFLECT_101)
        bands.append(image - up)
        image = down
    return bands


def test_the_pyramid_is_opencvs():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 1, 64, 48, dtype=torch.float64, generator=g)
    ours = laplacian_pyramid(image, levels=4)
    for band, reference in zip(ours, opencv_bands(image[0, 0].numpy(), 4), strict=True):
        np.testing.assert_allclose(band[0, 0].numpy(), reference, atol=1e-12)


def test_the_loss_weights_each_levels_unknown_mean_by_two_to_the_level():
    g = torch.Generator().manual_seed(1)
    pred = torch.rand(2, 1, 64, 64, dtype=torch.float64, generator=g)
    target = torch.rand(2, 1, 64, 64, dtype=torch.float64, generator=g)
    trimap = torch.full((2, 1, 64, 64), 255.0, dtype=torch.float64)
    trimap[0, :, 8:40, 4:60] = 128
    trimap[1, :, 30:64, 0:20] = 128
    expected = 0.0
    for i in range(5):
        mask = np.stack([(trimap[b, 0].numpy() == 128)[:: 2**i, :: 2**i] for b in range(2)])
        diff = np.stack([np.abs(opencv_bands(pred[b, 0].numpy(), 5)[i]
                                - opencv_bands(target[b, 0].numpy(), 5)[i]) for b in range(2)])
        expected += 2**i * diff[mask].sum() / mask.sum()
    assert laplacian_loss(pred, target, trimap).item() == pytest.approx(expected, rel=1e-6)


def test_a_constant_offset_costs_nothing_and_a_strand_does():
    target = torch.zeros(1, 1, 64, 64)
    trimap = torch.full((1, 1, 64, 64), 128)
    assert laplacian_loss(target + 0.3, target, trimap).item() == pytest.approx(0, abs=1e-6)
    strand = target.clone()
    strand[..., :, 31] = 0.5
    assert laplacian_loss(strand, target, trimap).item() > 0.05


def test_small_images_are_refused_with_the_size_needed():
    small = torch.zeros(1, 1, 40, 64)
    with pytest.raises(ValueError, match="at least 48 pixels"):
        laplacian_loss(small, small, small)


def test_the_config_weight_adds_a_laplacian_term():
    g = torch.Generator().manual_seed(2)
    batch = {"alpha": torch.rand(1, 1, 64, 64, generator=g),
             "trimap": torch.full((1, 1, 64, 64), 128.0)}
    prediction = torch.rand(1, 1, 64, 64, generator=g)
    terms = MattingTask().losses(prediction, batch, None, {"alpha": 0.5, "laplacian": 2.0})
    assert set(terms) == {"alpha", "laplacian"}
    expected = 2.0 * laplacian_loss(prediction, batch["alpha"], batch["trimap"])
    torch.testing.assert_close(terms["laplacian"], expected)
