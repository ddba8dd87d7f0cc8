"""SPKD losses through ``C×C`` Gram matrices instead of ``N×N`` maps (plain PyTorch).

For one image, with ``F̂t`` (``Ct×N``) and ``F̂s`` (``Cs×N``) position-normalised,

    Σ_ij (At − As)²_ij = ‖F̂t F̂tᵀ‖²_F + ‖F̂s F̂sᵀ‖²_F − 2‖F̂t F̂sᵀ‖²_F

so the spatial loss costs ``O(N·C²)`` time and ``O(C²)`` memory instead of ``O(N²·C)`` and
``O(N²)``. Its gradient is as cheap: with ``Kss = F̂sF̂sᵀ`` and ``M = F̂tF̂sᵀ``,
``∂/∂F̂s = 4·(Kss F̂s − Mᵀ F̂t)``, then back through the normalisation (written out below
rather than left to autograd, which would spend an extra ``Cs²·N`` product and several
elementwise passes). The right side subtracts terms of size ``~N²``, so a float32 Gram
loses the loss near convergence. The default ``accumulate="auto"`` avoids that without
float64 matmuls when the student is as wide as the teacher (the differences form,
:class:`_SpatialSimilarityOfDifferences`), and with float64 Grams otherwise; maps built
directly need no more than float32. The channel loss is the spatial loss of the transposed
features (:func:`channel_similarity`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.kernels import reference
from kdkit.kernels.common import (
    DEFAULT_ACCUMULATE,
    EPS,
    accumulation_dtype,
    batch_map_from_gram,
    result_dtype,
    spatial_loss_from_grams,
)


def _position_normalised(f: torch.Tensor, dtype: torch.dtype):
    """``B×C×S…`` → (``F̂`` ``B×C×N``, the norms ``B×1×N``) in ``dtype``."""
    f = f.flatten(2).to(dtype)
    norms = f.square().sum(dim=1, keepdim=True).sqrt_()  # 3× faster than .norm(dim=1) here
    return f * (1 / (norms + EPS)), norms


def _through_normalisation(grad, fs, norms, scale):
    """``∂L/∂F̂s`` (``grad``, ``B×Cs×N``, overwritten) times ``scale`` → ``∂L/∂f`` through
    ``F̂ = f / (‖f‖ + ε)``: ``g/(‖f‖ + ε) − F̂ (F̂ᵀg)/‖f‖`` per position (no term where
    ``f = 0``)."""
    dot = (fs * grad).sum(dim=1, keepdim=True)
    radial = dot * scale / torch.where(norms > 0, norms, 1.0)
    return grad.mul_(scale / (norms + EPS)).addcmul_(fs, radial, value=-1)


class _SpatialSimilarity(torch.autograd.Function):
    """The factored spatial loss with its closed-form backward (student only)."""

    @staticmethod
    def forward(ctx, student, teacher, dtype):
        fs, norms = _position_normalised(student, dtype)
        ft, _ = _position_normalised(teacher, dtype)
        kss, mts = fs @ fs.mT, ft @ fs.mT
        ctx.save_for_backward(fs, ft, norms, kss, mts)
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        return spatial_loss_from_grams(ft @ ft.mT, kss, mts, fs.shape[2])

    @staticmethod
    def backward(ctx, grad_output):
        fs, ft, norms, kss, mts = ctx.saved_tensors
        batch, n = fs.shape[0], fs.shape[2]
        # ∂L/∂F̂s = 4 (Kss F̂s − Mᵀ F̂t) / (B·N²)
        grad = torch.baddbmm(kss @ fs, mts.mT, ft, alpha=-1)
        scale = grad_output.to(grad.dtype) * 4 / (batch * n * n)
        grad = _through_normalisation(grad, fs, norms, scale)
        return grad.reshape(ctx.student_shape).to(ctx.student_dtype), None, None


class _SpatialSimilarityOfDifferences(torch.autograd.Function):
    """The spatial loss of a student with the teacher's channels, without cancellation:
    with ``P = F̂t + F̂s`` and ``Q = F̂t − F̂s`` (formed in float64, then rounded to ``dtype``:
    float32, or float64 for float64 features),
    ``At − As = ½(PᵀQ + QᵀP)``, so

        Σ_ij (At − As)²_ij = ½ (⟨PPᵀ, QQᵀ⟩ + ⟨PQᵀ, QPᵀ⟩)

    where every term is of the loss's own size (``Q`` is small near convergence, and no
    ``N²``-sized sums are subtracted): float32 Grams keep float32's relative precision.
    Backward: ``∂/∂F̂s = −4 F̂s (At − As) = −((PPᵀ − QPᵀ) Q + (PQᵀ − QQᵀ) P)``, using
    ``F̂s = (P − Q)/2``; then through the normalisation in float64 (elementwise, cheap)."""

    @staticmethod
    def forward(ctx, student, teacher, dtype):
        fs, norms = _position_normalised(student, torch.float64)
        ft, _ = _position_normalised(teacher, torch.float64)
        p, q = (ft + fs).to(dtype), (ft - fs).to(dtype)
        pp, qq, pq = p @ p.mT, q @ q.mT, p @ q.mT
        per_image = (pp.double() * qq).sum(dim=(1, 2)) + (pq.double() * pq.mT).sum(dim=(1, 2))
        batch, n = fs.shape[0], fs.shape[2]
        ctx.save_for_backward(fs, norms, p, q, pp, qq, pq)
        ctx.student_shape, ctx.student_dtype = student.shape, student.dtype
        return per_image.sum() / (2 * batch * n * n)

    @staticmethod
    def backward(ctx, grad_output):
        fs, norms, p, q, pp, qq, pq = ctx.saved_tensors
        batch, n = fs.shape[0], fs.shape[2]
        grad = torch.baddbmm((pp - pq.mT) @ q, pq - qq, p)  # −∂/∂F̂s Σ (At − As)²
        scale = grad_output.double() * -1 / (batch * n * n)
        # in float64: its radial part cancels (exactly, for a single channel)
        grad = _through_normalisation(grad.double(), fs, norms, scale)
        return grad.reshape(ctx.student_shape).to(ctx.student_dtype), None, None


def gram_is_cheaper(n: int, student_channels: int, teacher_channels: int) -> bool:
    """Whether the three ``C×C`` Grams (``N·(Ct² + Cs² + Ct·Cs)`` multiply-adds) cost less
    than the two ``N×N`` maps (``N²·(Cs + Ct)``): true unless ``N`` is below about ``C``."""
    cs, ct = student_channels, teacher_channels
    return ct * ct + cs * cs + ct * cs < n * (cs + ct)


def spatial_similarity(student: torch.Tensor, teacher: torch.Tensor,
                       accumulate: str = DEFAULT_ACCUMULATE):
    """``B×Cs×S…``, ``B×Ct×S…`` → scalar: MSE between the ``B×N×N`` spatial maps. Deep
    layers with fewer positions than channels (``N`` below about ``C``) take the
    materialised maps instead, which are then the cheaper exact route. ``"auto"``: for
    Grams the differences form when ``Cs = Ct``, else float64 Grams (the identity
    cancels); the maps in float32 (built directly). ``"fp32"``/``"fp64"``: the plain
    identity or the maps in that precision."""
    n = student[0, 0].numel()
    by_grams = gram_is_cheaper(n, student.shape[1], teacher.shape[1])
    if by_grams and accumulate == "auto" and student.shape[1] == teacher.shape[1]:
        loss = _SpatialSimilarityOfDifferences.apply(student, teacher.detach(),
                                                     result_dtype(student.dtype))
    elif by_grams:
        dtype = accumulation_dtype(accumulate, cancels=True, dtype=student.dtype)
        loss = _SpatialSimilarity.apply(student, teacher.detach(), dtype)
    else:
        dtype = accumulation_dtype(accumulate, cancels=False, dtype=student.dtype)
        loss = reference.spatial_similarity(student.to(dtype), teacher.to(dtype))
    return loss.to(result_dtype(student.dtype))


def channels_as_positions(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → the ``B×N×C`` view ``Fᵀ``: its spatial map (each column normalised,
    ``Fᵀ``'s columns being ``F``'s channels) is ``F``'s channel map."""
    return f.flatten(2).mT


def channel_similarity(student: torch.Tensor, teacher: torch.Tensor,
                       accumulate: str = DEFAULT_ACCUMULATE):
    """``B×C×S…``, ``B×C×S'…`` → scalar: MSE between the ``B×C×C`` channel maps. The
    channel map of ``F`` is the spatial map of ``Fᵀ`` (channels and positions swapped, the
    same ``+ε`` normalisation and the same mean over ``B·C²``), so this is
    :func:`spatial_similarity` of the transposed features: the ``C×C`` maps built directly
    while ``N`` is above about ``C``, and for deep layers (``N`` below about ``C``) the
    identity over the ``N×N`` Grams ``F̂tᵀF̂t``, ``F̂sᵀF̂s``, ``F̂tᵀF̂s`` (float64 under
    ``"auto"``: it cancels like the spatial one)."""
    return spatial_similarity(channels_as_positions(student), channels_as_positions(teacher),
                              accumulate)


def batch_similarity(student: torch.Tensor, teacher: torch.Tensor,
                     accumulate: str = DEFAULT_ACCUMULATE):
    """``B×…``, ``B×…`` → scalar: MSE between the row-normalised ``B×B`` batch Grams
    (already small: the same computation as the reference, at the chosen precision; a map
    built directly, so float32 under ``"auto"``)."""
    dtype = accumulation_dtype(accumulate, cancels=False, dtype=student.dtype)

    def batch_map(f):
        q = f.flatten(1).to(dtype)
        return batch_map_from_gram(q @ q.t())

    loss = F.mse_loss(batch_map(student), batch_map(teacher.detach()))
    return loss.to(result_dtype(student.dtype))
