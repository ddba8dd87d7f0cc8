import pytest
import torch
from torch import nn

from kdkit.adapters import ADAPTER_KINDS, build_adapter


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "kind, params",
    [("identity", 0), ("conv1x1", 64 * 128 + 128), ("conv1x1_nobias", 64 * 128),
     ("conv1x1_bn", 64 * 128 + 2 * 128)],
)
def test_adapter_maps_student_to_teacher_shape(kind, params):
    teacher_channels = 64 if kind == "identity" else 128
    adapter = build_adapter(kind, 64, teacher_channels)
    assert adapter(torch.randn(2, 64, 5, 7)).shape == (2, teacher_channels, 5, 7)
    assert count(adapter) == (0 if kind == "identity" else params)


def test_papers_four_adapters_add_304512_parameters():
    pairs = [(64, 128), (128, 256), (256, 512), (256, 512)]
    assert sum(count(build_adapter("conv1x1", s, t)) for s, t in pairs) == 304_512


def test_ofd_connector_is_conv_then_batchnorm():
    adapter = build_adapter("conv1x1_bn", 8, 16)
    assert isinstance(adapter[0], nn.Conv2d) and adapter[0].bias is None
    assert isinstance(adapter[1], nn.BatchNorm2d)


def test_bad_adapters_say_what_to_do():
    with pytest.raises(ValueError, match="conv1x1"):
        build_adapter("identity", 8, 16)
    with pytest.raises(ValueError, match="valid kinds"):
        build_adapter("conv3x3", 8, 16)
    assert "conv1x1" in ADAPTER_KINDS
