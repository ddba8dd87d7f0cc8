"""What every similarity backend shares: the precision rules and the maps and losses
computed from Gram matrices.

Precision: a loss comes back in float32, or float64 for float64 features
(:func:`result_dtype`); ``accumulate`` sets the dtype the Grams and maps are computed in
(:func:`accumulation_dtype`): ``"auto"`` (the default) float64 only for a form that cancels
(a Gram identity, which subtracts squared norms far larger than the loss) and the result
dtype for a map built directly; ``"fp32"`` / ``"fp64"`` force one precision everywhere. The
materialised maps compute half precision in float32 (:func:`at_least_float32`).

Gram identities (docs/kernels.md), for one image with position-normalised ``F̂t``
(``Ct×N``) and ``F̂s`` (``Cs×N``):

    spatial   Σ_ij (F̂tᵀF̂t − F̂sᵀF̂s)²_ij = ‖F̂tF̂tᵀ‖² + ‖F̂sF̂sᵀ‖² − 2‖F̂tF̂sᵀ‖²
    channel   Â_ab = G_ab / ((√G_aa + ε)(√G_bb + ε)) from the raw Gram G = F Fᵀ; or the
              spatial identity on the transposed features (the N×N Grams), as channel
              maps of F are spatial maps of Fᵀ
    batch     the raw ``B×B`` Gram of the flattened samples, each row L2-normalised
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.errors import ConfigError

__all__ = [
    "ACCUMULATE",
    "DEFAULT_ACCUMULATE",
    "EPS",
    "accumulation_dtype",
    "at_least_float32",
    "batch_map_from_gram",
    "channel_map_from_gram",
    "result_dtype",
    "spatial_loss_from_grams",
]

EPS = 1e-7  # added to every L2 norm of the spatial and channel normalisations
ACCUMULATE = {"fp32": torch.float32, "fp64": torch.float64}  # the forced precisions
DEFAULT_ACCUMULATE = "auto"  # float64 where the form cancels, else the result dtype


def accumulation_dtype(accumulate: str, cancels: bool = True,
                       dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The torch dtype a form computes in, for features of ``dtype``: ``"fp32"`` /
    ``"fp64"`` force it; ``"auto"`` gives float64 when the form ``cancels`` (a Gram
    identity) and :func:`result_dtype` otherwise (a map built directly: its rounding is
    the float32 reference's own). Anything else is a :class:`~kdkit.errors.ConfigError`."""
    if accumulate == "auto":
        return torch.float64 if cancels else result_dtype(dtype)
    if accumulate not in ACCUMULATE:
        raise ConfigError(
            f"accumulate must be 'auto', 'fp32' or 'fp64', got {accumulate!r}; 'auto' (the "
            "default) is float64 only where a Gram identity cancels")
    return ACCUMULATE[accumulate]


def result_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision a loss on features of ``dtype`` comes back in, and that the triton
    backward stores its products in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 when it is float16 or bfloat16, else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def channel_map_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Raw Gram ``G = F Fᵀ`` (``B×C×C``) → channel map ``G_ab / ((√G_aa + ε)(√G_bb + ε))``
    (``B×C×C``): the cosine similarity between channels, norms from the diagonal."""
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt() + EPS
    return gram / (norms[:, :, None] * norms[:, None, :])


def batch_map_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Raw ``B×B`` Gram of the flattened samples → the batch map: each row L2-normalised."""
    return F.normalize(gram, dim=1)


def spatial_loss_from_grams(ktt: torch.Tensor, kss: torch.Tensor, mts: torch.Tensor,
                            positions: int) -> torch.Tensor:
    """The MSE between the ``B×N×N`` spatial maps of teacher and student from the Grams of
    their position-normalised features: ``Ktt = F̂tF̂tᵀ`` (``B×Ct×Ct``), ``Kss = F̂sF̂sᵀ``
    (``B×Cs×Cs``), ``Mts = F̂tF̂sᵀ`` (``B×Ct×Cs``); ``positions`` is ``N`` → scalar."""
    def squared_norms(m):
        return m.square().sum(dim=(1, 2))

    per_image = squared_norms(ktt) + squared_norms(kss) - 2 * squared_norms(mts)
    return per_image.sum() / (ktt.shape[0] * positions * positions)
