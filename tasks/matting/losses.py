"""Matting losses on the trimap's unknown region.

Deep Image Matting's Charbonnier penalties: ``La(a, b) = Σ_{p∈U} sqrt((a_p − b_p)² + ε²) /
(|U| + ε)`` with ``ε = 1e-6`` and ``U`` the pixels where the trimap equals
``unknown_value``, summed over the whole batch. The SPKD papers' objective uses it twice,
against the ground truth and against the teacher's alpha (the "Hinton" term of a regression
task). The Laplacian loss (Hou & Liu 2019, as MG-Matting and MatteFormer compute it) compares
the band-pass levels of the two alphas, weighting fine detail such as hair strands.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["unknown_region", "alpha_prediction_loss", "composition_loss", "laplacian_loss"]

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


_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def _blur(x: torch.Tensor) -> torch.Tensor:
    """``B×1×H×W`` → the same, filtered by the 5×5 binomial kernel (reflected borders)."""
    kernel = torch.outer(_BINOMIAL, _BINOMIAL).to(x)[None, None]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), kernel)


def _expand(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``B×1×h×w`` → ``B×1×H×W`` (``H ≤ 2h``): zeros between the samples, then 4× the blur."""
    up = x.new_zeros(*x.shape[:2], 2 * x.shape[2], 2 * x.shape[3])
    up[..., ::2, ::2] = x
    return 4 * _blur(up[..., : size[0], : size[1]])


def laplacian_pyramid(x: torch.Tensor, levels: int = 5) -> list[torch.Tensor]:
    """``B×1×H×W`` → ``levels`` band-pass images, finest first (level ``i`` at ``H/2^i``):
    ``G_i − expand(G_{i+1})`` with ``G_0 = x``, ``G_{i+1} = blur(G_i)[::2, ::2]``. There is
    no low-pass residual: a constant image has an all-zero pyramid."""
    bands = []
    for _ in range(levels):
        down = _blur(x)[..., ::2, ::2]
        bands.append(x - _expand(down, x.shape[-2:]))
        x = down
    return bands


def laplacian_loss(pred: torch.Tensor, target: torch.Tensor, trimap: torch.Tensor,
                   unknown_value: float = 128, levels: int = 5) -> torch.Tensor:
    """``B×1×H×W`` predicted and target alpha, trimap → scalar: ``Σ_i 2^i · Σ_{U_i}
    |L_i(p) − L_i(t)| / |U_i|`` over the Laplacian pyramid's levels ``i = 0..levels−1``,
    with ``U_i`` the unknown mask subsampled by ``2^i``. Images need at least 2^(levels−1)·3
    pixels a side (the reflected blur of the coarsest level)."""
    _check(pred, target, trimap, "laplacian_loss")
    side = 3 * 2 ** (levels - 1)
    if min(pred.shape[-2:]) < side:
        raise ValueError(f"laplacian_loss with {levels} levels needs images at least {side} "
                         f"pixels a side, found {tuple(pred.shape[-2:])}")
    mask = unknown_region(trimap, unknown_value).to(pred.dtype)
    total = pred.new_zeros(())
    for i, (p, t) in enumerate(zip(laplacian_pyramid(pred, levels),
                                   laplacian_pyramid(target.detach(), levels))):
        weight = mask[..., :: 2**i, :: 2**i]
        total = total + 2**i * ((p - t).abs() * weight).sum() / (weight.sum() + EPS)
    return total
