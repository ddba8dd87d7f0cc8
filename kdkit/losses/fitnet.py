"""FitNets hint loss (Romero et al. 2015): MSE between the adapted student feature and
the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["fitnet_loss", "FitNetLoss"]


def fitnet_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``B×C×…`` twice (the student already through its regressor) → scalar: the mean of
    ``(Fs − Ft)²`` over every element."""
    name = "fitnet_loss"
    require_min_dims(name, student, "student", 2, "B×C×…")
    require_match(
        name, "shape", student, teacher, slice(None),
        "Map the student to the teacher's channels with an adapter (e.g. 'conv1x1'), at a "
        "layer of the same spatial size.",
    )
    return F.mse_loss(student, teacher.detach())


@register_loss("fitnet")
class FitNetLoss(DistillationLoss):
    """Module form of :func:`fitnet_loss`."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return fitnet_loss(student, teacher)
