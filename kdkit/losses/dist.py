"""DIST (Huang et al. 2022): relations between class probabilities, matched by Pearson
correlation across classes (inter) and across samples (intra)."""

from __future__ import annotations

import torch

from kdkit.errors import ConfigError
from kdkit.losses._shapes import require_logits, require_positive_temperature
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["pearson", "dist_loss", "DISTLoss"]

EPS = 1e-8


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``R×D`` twice → ``R``: each row pair's ``Σ(a−ā)(b−b̄) / (‖a−ā‖·‖b−b̄‖ + 1e-8)``
    (0 where a row is constant)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> torch.Tensor:
    """``B×K`` or ``B×K×H×W`` logits (each pixel a sample) → scalar:
    ``τ²·(β·(1 − mean_i ρ(Ys_i, Yt_i)) + γ·(1 − mean_k ρ(Ys_·k, Yt_·k)))`` with
    ``Y = softmax(z/τ)`` over the ``K ≥ 2`` classes, rows ``i`` the samples."""
    name = "dist_loss"
    require_positive_temperature(name, temperature)
    require_logits(name, student_logits, teacher_logits)
    if student_logits.shape[1] < 2:
        raise ConfigError(
            f"{name}: DIST needs class logits (K ≥ 2 on dim 1), found K = "
            f"{student_logits.shape[1]}: a softmax over one channel is the constant 1, so "
            "there is no relation to distil. It does not apply to a single-channel output "
            "such as matting's alpha; use a feature loss (fitnet, cwd, mgd) there."
        )

    def probabilities(z: torch.Tensor) -> torch.Tensor:  # samples × classes
        return torch.softmax(z.movedim(1, -1).reshape(-1, z.shape[1]) / temperature, dim=1)

    y_s, y_t = probabilities(student_logits), probabilities(teacher_logits.detach())
    inter = 1 - pearson(y_s, y_t).mean()
    intra = 1 - pearson(y_s.T, y_t.T).mean()
    return temperature**2 * (beta * inter + gamma * intra)


@register_loss("dist")
class DISTLoss(DistillationLoss):
    """Module form of :func:`dist_loss`."""

    def __init__(self, temperature: float = 1.0, beta: float = 1.0, gamma: float = 1.0):
        super().__init__()
        self.temperature, self.beta, self.gamma = temperature, beta, gamma

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return dist_loss(student_logits, teacher_logits, self.temperature, self.beta, self.gamma)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, beta={self.beta}, gamma={self.gamma}"
