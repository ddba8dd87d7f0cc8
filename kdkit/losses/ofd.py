"""Overhaul of feature distillation (OFD, Heo et al. 2019): a margin ReLU on the teacher's
pre-ReLU features and a partial L2 on the student's connector output."""

from __future__ import annotations

import math

import torch
from torch import nn

from kdkit.errors import ConfigError
from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["ofd_margin", "ofd_loss", "ofd_layer_weights", "OFDLoss"]


def ofd_margin(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Per-channel margin ``m`` (shape ``C``) from a BatchNorm's ``(β, |γ|)``: the expected
    value of a negative response, ``m = β − s·φ(β/s)/Φ(−β/s)`` with ``s = |γ|``, or ``−3s``
    where ``Φ(−β/s) ≤ 1e-3``. A channel with ``γ = 0`` is the constant ``β``: ``min(β, 0)``."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.affine:
        raise ConfigError(
            f"ofd_margin needs an affine BatchNorm module (the teacher's BN before the ReLU), "
            f"got {type(bn).__name__}"
        )
    s = bn.weight.detach().double().abs()
    beta = bn.bias.detach().double()
    safe_s = torch.where(s > 0, s, torch.ones_like(s))
    z = beta / safe_s
    cdf_neg = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Φ(−β/s)
    pdf = torch.exp(-0.5 * z**2) / math.sqrt(2.0 * math.pi)  # φ(β/s)
    expected_negative = beta - safe_s * pdf / cdf_neg.clamp_min(1e-300)
    margin = torch.where(cdf_neg > 1e-3, expected_negative, -3.0 * s)
    margin = torch.where(s > 0, margin, beta.clamp(max=0.0))
    return margin.to(bn.weight.dtype)


def ofd_loss(
    student: torch.Tensor, teacher_pre_relu: torch.Tensor, margin: torch.Tensor
) -> torch.Tensor:
    """``B×C×H×W`` student (after the connector), the teacher's pre-ReLU ``B×C×H×W`` and a
    ``C`` margin → scalar: ``Σ (Fs − T)²·[(Fs > T) ∨ (T > 0)] / B`` with ``T = max(Ft, m)``."""
    name = "ofd_loss"
    require_min_dims(name, student, "student", 2, "B×C×…")
    require_match(
        name, "shape", student, teacher_pre_relu, slice(None),
        "Map the student through a 'conv1x1_bn' adapter to the teacher's channels, at a layer "
        "of the same spatial size.",
    )
    if margin.dim() != 1 or margin.shape[0] != student.shape[1]:
        raise ConfigError(
            f"{name}: margin must hold one value per channel ({student.shape[1]}), found "
            f"shape {tuple(margin.shape)}"
        )
    view = (1, -1) + (1,) * (student.dim() - 2)
    target = torch.maximum(teacher_pre_relu.detach(), margin.to(student.dtype).view(view))
    mask = (student > target) | (target > 0)
    return ((student - target).pow(2) * mask).sum() / student.shape[0]


def ofd_layer_weights(num_layers: int) -> list[float]:
    """OFD's per-layer weights ``1/2^(n−i−1)`` for layers ``i = 0…n−1`` (deepest weighs 1)."""
    return [1.0 / 2 ** (num_layers - i - 1) for i in range(num_layers)]


@register_loss("ofd")
class OFDLoss(DistillationLoss):
    """Module form of :func:`ofd_loss`. The margin is given, or taken from the teacher's
    BatchNorm by :meth:`bind_teacher` (the Distiller calls it with the recorded module)."""

    def __init__(self, margin: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("margin", None if margin is None else margin.detach().clone())

    def bind_teacher(self, modules: list[nn.Module]) -> None:
        """Take the margin from the single teacher BatchNorm this loss distils from."""
        if len(modules) != 1:
            raise ConfigError(
                f"OFD distils one teacher layer per term (the BatchNorm before the ReLU), "
                f"got {len(modules)}; give each layer its own term")
        self.margin = ofd_margin(modules[0])

    def forward(self, student: torch.Tensor, teacher_pre_relu: torch.Tensor) -> torch.Tensor:
        if self.margin is None:
            raise RuntimeError(
                "OFDLoss has no margin: pass margin=ofd_margin(teacher_bn), or use it in a "
                "Distiller term whose teacher module is that BatchNorm"
            )
        return ofd_loss(student, teacher_pre_relu, self.margin)
