"""Adapters (connectors): map a student feature ``B×Cs×H×W`` to the teacher's ``B×Ct×H×W``.

Kinds:
    ``identity``          no parameters; requires ``Cs == Ct``
    ``conv1x1``           1×1 conv with bias (the SPKD papers' adapter)
    ``conv1x1_nobias``    1×1 conv without bias
    ``conv1x1_bn``        1×1 conv without bias + BatchNorm (the OFD connector)
"""

from __future__ import annotations

from torch import nn

from kdkit.errors import ConfigError

__all__ = ["ADAPTER_KINDS", "build_adapter"]

ADAPTER_KINDS = ("identity", "conv1x1", "conv1x1_nobias", "conv1x1_bn")


def _conv1x1(student_channels: int, teacher_channels: int, bias: bool) -> nn.Conv2d:
    conv = nn.Conv2d(student_channels, teacher_channels, kernel_size=1, bias=bias)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


def build_adapter(kind: str, student_channels: int, teacher_channels: int) -> nn.Module:
    """An adapter of ``kind`` taking ``student_channels`` to ``teacher_channels``."""
    if kind == "identity":
        if student_channels != teacher_channels:
            raise ConfigError(
                f"an identity adapter needs equal channels, found student {student_channels} "
                f"and teacher {teacher_channels}; use kind 'conv1x1' to map between them"
            )
        return nn.Identity()
    if kind in ("conv1x1", "conv1x1_nobias"):
        return _conv1x1(student_channels, teacher_channels, bias=kind == "conv1x1")
    if kind == "conv1x1_bn":
        bn = nn.BatchNorm2d(teacher_channels)
        nn.init.ones_(bn.weight)
        nn.init.zeros_(bn.bias)
        return nn.Sequential(_conv1x1(student_channels, teacher_channels, bias=False), bn)
    raise ConfigError(f"unknown adapter kind {kind!r}; valid kinds: {', '.join(ADAPTER_KINDS)}")

