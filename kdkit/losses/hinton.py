"""Hinton KD: KL divergence between temperature-softened class distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses._shapes import require_logits, require_positive_temperature
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["hinton_kd_loss", "HintonKDLoss"]


def hinton_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``KL(softmax(zt/T) ‖ softmax(zs/T))·T²``: classes on dim 1, summed over classes and
    averaged over samples (and pixels). ``B×K`` or ``B×K×H×W`` → scalar."""
    name = "hinton_kd_loss"
    require_positive_temperature(name, temperature)
    require_logits(name, student_logits, teacher_logits)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * temperature**2


@register_loss("hinton")
class HintonKDLoss(DistillationLoss):
    """Module form of :func:`hinton_kd_loss`."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return hinton_kd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
