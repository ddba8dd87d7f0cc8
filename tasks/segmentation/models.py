"""Segmentation networks: a timm encoder and a light FPN head.

:class:`SegmentationFPN` takes ``B×3×H×W`` images (any size) and returns ``B×K×H×W``
class logits. Its stable module names, the same for every encoder, are what distillation
terms and pruning configs refer to:

- ``stage1`` … ``stage4``: encoder features at strides 4, 8, 16, 32 (identity taps);
- ``fpn1`` … ``fpn4``: FPN outputs (``decoder_channels`` each) at those strides;
- ``logits``: the class logits at the input resolution (an identity tap);
- ``encoder.*``: the timm model's own modules (e.g. ``encoder.layer4.1.bn2`` on a ResNet,
  the BN before a block's last ReLU, for OFD); ``decoder.*``: the head.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationFPN"]


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class FPNHead(nn.Module):
    """Lateral 1×1 convs to ``channels``, a top-down pathway (nearest upsample + add), a
    3×3 conv-BN-ReLU per level, then the Panoptic-FPN semantic merge: every level is
    upsampled to stride 4 and summed, refined by one 3×3 conv-BN-ReLU and classified by
    a 1×1 conv. Returns ``(level outputs deepest last, B×K×H/4×W/4 logits)``."""

    def __init__(self, in_channels: list[int], channels: int, classes: int):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(channels, channels) for _ in in_channels)
        self.merge = _conv_bn_relu(channels, channels)
        self.classifier = nn.Conv2d(channels, classes, 1)

    def forward(self, features: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        top = self.lateral[-1](features[-1])
        tops = [top]
        for level in range(len(features) - 2, -1, -1):
            lateral = self.lateral[level](features[level])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
            tops.insert(0, top)
        levels = [smooth(t) for smooth, t in zip(self.smooth, tops)]
        size = levels[0].shape[-2:]
        merged = sum(F.interpolate(x, size=size, mode="bilinear", align_corners=False)
                     if x.shape[-2:] != size else x for x in levels)
        return levels, self.classifier(self.merge(merged))


class SegmentationFPN(nn.Module):
    """A timm ``encoder`` (``features_only``, strides 4–32, never downloads weights unless
    ``pretrained``) with an :class:`FPNHead` of ``decoder_channels``; ``encoder_args`` go
    to ``timm.create_model`` (e.g. ``channels`` for a narrow ResNet)."""

    def __init__(self, encoder: str = "resnet18", classes: int = 21,
                 decoder_channels: int = 64, encoder_args: dict[str, Any] | None = None,
                 pretrained: bool = False):
        super().__init__()
        self.encoder = timm.create_model(encoder, features_only=True, out_indices=(1, 2, 3, 4),
                                         pretrained=pretrained, **(encoder_args or {}))
        channels = self.encoder.feature_info.channels()
        for k in range(1, 5):
            setattr(self, f"stage{k}", nn.Identity())
            setattr(self, f"fpn{k}", nn.Identity())
        self.decoder = FPNHead(channels, decoder_channels, classes)
        self.logits = nn.Identity()

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"SegmentationFPN takes B×3×H×W images, got shape "
                             f"{tuple(image.shape)}")
        features = [getattr(self, f"stage{k}")(f)
                    for k, f in enumerate(self.encoder(image), start=1)]
        levels, logits = self.decoder(features)
        for k, level in enumerate(levels, start=1):
            getattr(self, f"fpn{k}")(level)
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.logits(logits)
