"""Flow of solution procedure (FSP, Yim et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from kdkit.errors import ConfigError
from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["fsp_matrix", "fsp_loss", "FSPLoss"]


def fsp_matrix(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """``B×C1×H1×W1`` and ``B×C2×H2×W2`` → ``B×C1×C2``: ``F1 F2ᵀ / N``, the larger map
    first average-pooled to the smaller one's size."""
    require_min_dims("fsp_matrix", f1, "first map", 4, "B×C×H×W")
    require_min_dims("fsp_matrix", f2, "second map", 4, "B×C×H×W")
    size1, size2 = tuple(f1.shape[2:]), tuple(f2.shape[2:])
    if size1 != size2:
        if all(a >= b for a, b in zip(size1, size2)):
            f1 = F.adaptive_avg_pool2d(f1, size2)
        elif all(a <= b for a, b in zip(size1, size2)):
            f2 = F.adaptive_avg_pool2d(f2, size1)
        else:
            raise ConfigError(
                f"fsp_matrix: one map must be at least as large as the other in both spatial "
                f"dims; found {size1} and {size2}"
            )
    a, b = f1.flatten(2), f2.flatten(2)
    return a @ b.transpose(1, 2) / a.shape[2]


def fsp_loss(
    student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Lists of ``L ≥ 2`` maps (student adapted to teacher channels) → scalar: the sum over
    consecutive pairs ``(i, i+1)`` of the MSE between student and teacher FSP matrices."""
    name = "fsp_loss"
    if len(student_feats) != len(teacher_feats) or len(student_feats) < 2:
        raise ConfigError(
            f"{name}: needs the same number (at least 2) of student and teacher maps; found "
            f"{len(student_feats)} student and {len(teacher_feats)} teacher maps"
        )
    total = student_feats[0].new_zeros(())
    for i, (s, t) in enumerate(zip(student_feats, teacher_feats)):
        require_match(
            f"{name} (map {i})", "batch size and channels", s, t, slice(0, 2),
            "Add an adapter (e.g. 'conv1x1') that maps student channels to teacher channels.",
        )
    for i in range(len(student_feats) - 1):
        gs = fsp_matrix(student_feats[i], student_feats[i + 1])
        gt = fsp_matrix(teacher_feats[i].detach(), teacher_feats[i + 1].detach())
        total = total + F.mse_loss(gs, gt)
    return total


@register_loss("fsp")
class FSPLoss(DistillationLoss):
    """Module form of :func:`fsp_loss`; takes lists of maps."""

    takes_lists = True

    def forward(
        self, student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        return fsp_loss(student_feats, teacher_feats)
