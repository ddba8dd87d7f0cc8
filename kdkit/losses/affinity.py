"""Pair-wise affinity distillation (Liu et al., structured KD for dense prediction) and its
cross-image form (the relational idea of CIRKD, Yang et al.), exact at full resolution.

The affinity of two positions is the cosine similarity of their feature vectors,
``a_ij = f_i·f_j / ((‖f_i‖ + ε)(‖f_j‖ + ε))`` (``ε = 1e-7``: an all-zero position has
affinity 0 with every position, itself included). The pair-wise loss is
``Σ_ij (a^s_ij − a^t_ij)² / N²`` per image, averaged over the batch: the spatial similarity
map of SPKD under another name, so it runs on the same backends and Gram identity
(``docs/kernels.md``); the cross-image loss is the same map over the ``B·N`` positions of
the whole batch, ``Σ_ij (a^s_ij − a^t_ij)² / (B·N)²``. Definitions and sources:
``docs/methods.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit import kernels
from kdkit.distributed import all_gather_with_grad
from kdkit.errors import ConfigError
from kdkit.kernels import DEFAULT_ACCUMULATE
from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = [
    "authors_max_pool",
    "batch_as_one_image",
    "pairwise_affinity_loss",
    "cross_image_affinity_loss",
    "PairwiseAffinityLoss",
    "CrossImageAffinityLoss",
]

_SAME_POSITIONS = "Distil layers of equal stride, or resize one feature map to the other's size."


def authors_max_pool(f: torch.Tensor, scale: float) -> torch.Tensor:
    """``B×C×H×W`` → ``B×C×⌈H/kh⌉×⌈W/kw⌉``: the authors' max-pooling before the map, kernel
    = stride = ``max(1, int(size·scale))`` per side, ``ceil_mode`` (``scale = 0.5`` leaves
    a 2×2 map)."""
    if not 0 < scale <= 1:
        raise ConfigError(f"pool must be a scale in (0, 1] (the authors use 0.5), got {scale}")
    if f.dim() != 4:
        raise ConfigError(f"pool needs B×C×H×W feature maps; found shape {tuple(f.shape)}")
    kernel = [max(1, int(size * scale)) for size in f.shape[2:]]
    return F.max_pool2d(f, kernel_size=kernel, stride=kernel, ceil_mode=True)


def batch_as_one_image(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``1×C×(B·N)``: every position of the batch as a position of one image
    (image-major), so its spatial map is the ``B·N × B·N`` cross-image map."""
    return f.flatten(2).transpose(0, 1).reshape(1, f.shape[1], -1)


def _prepared(name, student, teacher, pool):
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_min_dims(name, teacher, "teacher", 3, "B×C×H×W")
    require_match(name, "batch size", student, teacher, 0, "Pass the same batch to both models.")
    if pool is not None:
        student, teacher = authors_max_pool(student, pool), authors_max_pool(teacher, pool)
    require_match(name, "spatial size", student, teacher, slice(2, None), _SAME_POSITIONS)
    return student, teacher


def pairwise_affinity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    pool: float | None = None,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
) -> torch.Tensor:
    """``B×Cs×H×W`` and ``B×Ct×H×W`` (any channels, no adapter) → scalar: the mean over
    images of ``Σ_ij (a^s_ij − a^t_ij)² / N²``, at full resolution (``pool=None``) or after
    :func:`authors_max_pool` with ``pool`` as the scale."""
    student, teacher = _prepared("pairwise_affinity_loss", student, teacher, pool)
    return kernels.spatial_similarity(student, teacher, backend, accumulate)


def cross_image_affinity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    pool: float | None = None,
    gather: bool = False,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
) -> torch.Tensor:
    """``B×Cs×H×W`` and ``B×Ct×H×W`` → scalar: ``Σ_ij (a^s_ij − a^t_ij)² / (B·N)²`` over
    all pairs of positions of all images of the batch. With ``gather`` in multi-process
    training the batch is the global one (gathered with gradients, as
    ``batch_similarity``)."""
    student, teacher = _prepared("cross_image_affinity_loss", student, teacher, pool)
    if gather:
        student, teacher = all_gather_with_grad(student), all_gather_with_grad(teacher)
    return kernels.spatial_similarity(batch_as_one_image(student), batch_as_one_image(teacher),
                                      backend, accumulate)


@register_loss("pairwise_affinity")
class PairwiseAffinityLoss(DistillationLoss):
    """Module form of :func:`pairwise_affinity_loss`."""

    def __init__(self, pool: float | None = None, backend: str = "auto",
                 accumulate: str = DEFAULT_ACCUMULATE):
        super().__init__()
        self.pool, self.backend, self.accumulate = pool, backend, accumulate

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return pairwise_affinity_loss(student, teacher, self.pool, self.backend,
                                      self.accumulate)

    def extra_repr(self) -> str:
        return f"pool={self.pool}, backend={self.backend!r}, accumulate={self.accumulate!r}"


@register_loss("cross_image_affinity")
class CrossImageAffinityLoss(PairwiseAffinityLoss):
    """Module form of :func:`cross_image_affinity_loss` (``gather``: the global batch)."""

    def __init__(self, pool: float | None = None, gather: bool = False, backend: str = "auto",
                 accumulate: str = DEFAULT_ACCUMULATE):
        super().__init__(pool, backend, accumulate)
        self.gather = gather

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return cross_image_affinity_loss(student, teacher, self.pool, self.gather,
                                         self.backend, self.accumulate)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gather={self.gather}"
