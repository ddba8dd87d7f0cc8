"""SPKD losses through ``C×C`` Gram matrices instead of ``N×N`` maps (plain PyTorch).

For one image, with ``F̂t`` (``Ct×N``) and ``F̂s`` (``Cs×N``) position-normalised,

    Σ_ij (At − As)²_ij = ‖F̂t F̂tᵀ‖²_F + ‖F̂s F̂sᵀ‖²_F − 2‖F̂t F̂sᵀ‖²_F

so the spatial loss costs ``O(N·C²)`` time and ``O(C²)`` memory instead of ``O(N²·C)`` and
``O(N²)``. The right side subtracts terms of size ``~N²``: ``accumulate="fp64"`` computes the
Grams in float64 so the loss stays accurate when the student is close to the teacher.
Autograd gives the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.kernels.reference import EPS

ACCUMULATE = {"fp32": torch.float32, "fp64": torch.float64}


def accumulation_dtype(accumulate: str) -> torch.dtype:
    """``"fp32"`` / ``"fp64"`` → the torch dtype; anything else is a ``ValueError``."""
    if accumulate not in ACCUMULATE:
        raise ValueError(f"accumulate must be 'fp32' or 'fp64', got {accumulate!r}")
    return ACCUMULATE[accumulate]


def _result_dtype(f: torch.Tensor) -> torch.dtype:
    return torch.float64 if f.dtype == torch.float64 else torch.float32


def _position_normalised(f: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    f = f.flatten(2).to(dtype)
    return f / (f.norm(dim=1, keepdim=True) + EPS)


def _squared_norm(m: torch.Tensor) -> torch.Tensor:
    return m.square().sum(dim=(1, 2))


def spatial_similarity(student: torch.Tensor, teacher: torch.Tensor, accumulate: str = "fp64"):
    """``B×Cs×S…``, ``B×Ct×S…`` → scalar: MSE between the ``B×N×N`` spatial maps."""
    dtype = accumulation_dtype(accumulate)
    fs = _position_normalised(student, dtype)
    ft = _position_normalised(teacher.detach(), dtype)
    batch, n = fs.shape[0], fs.shape[2]
    per_image = (
        _squared_norm(ft @ ft.mT) + _squared_norm(fs @ fs.mT) - 2 * _squared_norm(ft @ fs.mT)
    )
    return (per_image.sum() / (batch * n * n)).to(_result_dtype(student))


def channel_map_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Raw Gram ``G = F Fᵀ`` (``B×C×C``) → channel map ``G_ab / ((√G_aa + ε)(√G_bb + ε))``."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt() + EPS
    return gram / (norms[:, :, None] * norms[:, None, :])


def channel_similarity(student: torch.Tensor, teacher: torch.Tensor, accumulate: str = "fp64"):
    """``B×C×S…``, ``B×C×S'…`` → scalar: MSE between the ``B×C×C`` channel maps, from one
    raw Gram per side (the channel norms are the square roots of its diagonal)."""
    dtype = accumulation_dtype(accumulate)
    fs = student.flatten(2).to(dtype)
    ft = teacher.detach().flatten(2).to(dtype)
    loss = F.mse_loss(channel_map_from_gram(fs @ fs.mT), channel_map_from_gram(ft @ ft.mT))
    return loss.to(_result_dtype(student))


def batch_similarity(student: torch.Tensor, teacher: torch.Tensor, accumulate: str = "fp64"):
    """``B×…``, ``B×…`` → scalar: MSE between the row-normalised ``B×B`` batch Grams
    (already small: the same computation as the reference, at the chosen precision)."""
    dtype = accumulation_dtype(accumulate)

    def gram(f):
        q = f.flatten(1).to(dtype)
        return F.normalize(q @ q.t(), dim=1)

    return F.mse_loss(gram(student), gram(teacher.detach())).to(_result_dtype(student))
