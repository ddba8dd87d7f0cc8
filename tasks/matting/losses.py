"""Matting losses (Deep Image Matting): Charbonnier penalties on the trimap's unknown region.

``La(a, b) = Σ_{p∈U} sqrt((a_p − b_p)² + ε²) / (|U| + ε)`` with ``ε = 1e-6`` and ``U`` the
pixels where the trimap equals ``unknown_value``, summed over the whole batch. The SPKD
papers' objective uses it twice, against the ground truth and against the teacher's alpha
(the "Hinton" term of a regression task).
"""

from __future__ import annotations

import torch

__all__ = ["unknown_region", "alpha_prediction_loss", "composition_loss"]

EPS = 1e-6


def unknown_region(trimap: torch.Tensor, unknown_value: float = 128) -> torch.Tensor:
    """``B×1×H×W`` trimap (raw values) → float mask of its unknown pixels, same shape."""
    return (trimap == unknown_value).to(torch.float32)


def _check(pred: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor, name: str) -> None:
    if pred.shape != target.shape or pred.shape[-2:] != trimap.shape[-2:] or (
        pred.shape[0] != trimap.shape[0]
    ):
        raise ValueError(
            f"{name}: prediction, target and trimap must share batch and spatial size; found "
            f"{tuple(pred.shape)}, {tuple(target.shape)} and {tuple(trimap.shape)}"
        )


def alpha_prediction_loss(pred: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor,
                          unknown_value: float = 128, eps: float = EPS) -> torch.Tensor:
    """``B×1×H×W`` predicted and target alpha, ``B×1×H×W`` trimap → scalar:
    ``Σ_U sqrt((p − t)² + ε²) / (|U| + ε)``."""
    _check(pred, target, trimap, "alpha_prediction_loss")
    mask = unknown_region(trimap, unknown_value).to(pred.dtype)
    penalty = torch.sqrt((pred - target.detach()) ** 2 + eps**2)
    return (penalty * mask).sum() / (mask.sum() + eps)


def composition_loss(pred_alpha: torch.Tensor, image: torch.Tensor, fg: torch.Tensor,
                     bg: torch.Tensor, trimap: torch.Tensor, unknown_value: float = 128,
                     eps: float = EPS) -> torch.Tensor:
    """``B×1×H×W`` alpha, ``B×3×H×W`` image, foreground and background in [0, 1], trimap →
    scalar: the same Charbonnier form between ``α·F + (1 − α)·B`` and the image, averaged
    over the three colour channels of the unknown pixels."""
    composite = pred_alpha * fg + (1 - pred_alpha) * bg
    _check(composite, image, trimap, "composition_loss")
    mask = unknown_region(trimap, unknown_value).to(pred_alpha.dtype)
    penalty = torch.sqrt((composite - image) ** 2 + eps**2)
    return (penalty * mask).sum() / (3 * mask.sum() + eps)
