"""Attention transfer (Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["attention_map", "attention_transfer_loss", "AttentionTransferLoss"]

EPS = 1e-6


def attention_map(f: torch.Tensor, p: float = 2) -> torch.Tensor:
    """``B×C×S…`` → ``B×N``: ``Σ_c |F_c|^p`` flattened, divided by ``(‖·‖₂ + 1e-6)``."""
    a = f.abs().pow(p).sum(dim=1).flatten(1)
    return a / (a.norm(dim=1, keepdim=True) + EPS)


def attention_transfer_loss(
    student: torch.Tensor, teacher: torch.Tensor, p: float = 2
) -> torch.Tensor:
    """``B×Cs×H×W`` and ``B×Ct×H×W`` (any channels) → scalar: MSE between attention maps."""
    name = "attention_transfer_loss"
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_min_dims(name, teacher, "teacher", 3, "B×C×H×W")
    require_match(name, "batch size", student, teacher, 0, "Pass the same batch to both models.")
    require_match(
        name, "spatial size", student, teacher, slice(2, None),
        "Distil layers of equal stride, or resize one feature map to the other's size.",
    )
    return F.mse_loss(attention_map(student, p), attention_map(teacher.detach(), p))


@register_loss("attention_transfer")
class AttentionTransferLoss(DistillationLoss):
    """Module form of :func:`attention_transfer_loss`."""

    def __init__(self, p: float = 2):
        super().__init__()
        self.p = p

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return attention_transfer_loss(student, teacher, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
