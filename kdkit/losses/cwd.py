"""Channel-wise distillation (CWD, Shu et al. 2021): each channel's map, softmaxed over
its positions, is a distribution; the student's is pulled to the teacher's by KL."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.losses._shapes import require_match, require_min_dims, require_positive_temperature
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["cwd_loss", "CWDLoss"]


def cwd_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``B×C×H×W`` twice → scalar: ``τ²/(B·C) · Σ_{b,c} KL(softmax(Ft_bc/τ) ‖
    softmax(Fs_bc/τ))``, each softmax over the ``H·W`` positions of one channel."""
    name = "cwd_loss"
    require_positive_temperature(name, temperature)
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_match(
        name, "shape", student, teacher, slice(None),
        "Map the student to the teacher's channels with an adapter (e.g. 'conv1x1'), at a "
        "layer of the same spatial size.",
    )
    log_p_student = F.log_softmax(student.flatten(2) / temperature, dim=2)
    log_p_teacher = F.log_softmax(teacher.detach().flatten(2) / temperature, dim=2)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="none", log_target=True).sum(dim=2)
    return kl.mean() * temperature**2


@register_loss("cwd")
class CWDLoss(DistillationLoss):
    """Module form of :func:`cwd_loss`."""

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cwd_loss(student, teacher, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
