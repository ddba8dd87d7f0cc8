"""Similarity-preserving KD (SPKD): batch, spatial and channel similarity maps.

All three compare a student map with the teacher's by the mean squared error over every
map entry (definitions: ``docs/methods.md``). ``backend`` and ``accumulate`` choose how the
maps are computed (``kdkit.kernels``, ``docs/kernels.md``); the value is the same up to
rounding.
"""

from __future__ import annotations

import torch

from kdkit import kernels
from kdkit.distributed import all_gather_with_grad
from kdkit.errors import ConfigError
from kdkit.kernels import DEFAULT_ACCUMULATE
from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = [
    "batch_similarity_loss",
    "spatial_similarity_loss",
    "channel_similarity_loss",
    "spatial_channel_similarity_loss",
    "BatchSimilarityLoss",
    "SpatialSimilarityLoss",
    "ChannelSimilarityLoss",
    "SpatialChannelSimilarityLoss",
]

_SAME_BATCH = "Pass the same batch to both models."
_SAME_POSITIONS = "Distil layers of equal stride, or resize one feature map to the other's size."
_ADAPT = "Add an adapter (e.g. 'conv1x1') that maps student channels to teacher channels."


def _check_feature_maps(name: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_min_dims(name, teacher, "teacher", 3, "B×C×H×W")
    require_match(name, "batch size", student, teacher, 0, _SAME_BATCH)


def batch_similarity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
    gather: bool = False,
) -> torch.Tensor:
    """Tung & Mori: ``B×…`` and ``B×…`` (any sizes after B) → scalar, MSE over ``B·B``.
    With ``gather`` in multi-process training the map is over the global batch (every
    process's samples, gathered with gradients); without, each process's own batch."""
    name = "batch_similarity_loss"
    require_min_dims(name, student, "student", 2, "B×…")
    require_min_dims(name, teacher, "teacher", 2, "B×…")
    require_match(name, "batch size", student, teacher, 0, _SAME_BATCH)
    if gather:
        student, teacher = all_gather_with_grad(student), all_gather_with_grad(teacher)
    if student.shape[0] < 2:
        raise ConfigError(
            f"{name}: a batch similarity map needs at least 2 samples, found a batch of "
            f"{student.shape[0]}; use a larger batch (per process, unless gather=True) or "
            "drop the batch term"
        )
    return kernels.batch_similarity(student, teacher, backend, accumulate)


def spatial_similarity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
) -> torch.Tensor:
    """``B×Cs×H×W`` and ``B×Ct×H×W`` (any channels) → scalar, MSE over the ``B×N×N`` maps
    of cosine similarity between positions."""
    name = "spatial_similarity_loss"
    _check_feature_maps(name, student, teacher)
    require_match(name, "spatial size", student, teacher, slice(2, None), _SAME_POSITIONS)
    return kernels.spatial_similarity(student, teacher, backend, accumulate)


def channel_similarity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
) -> torch.Tensor:
    """``B×C×Hs×Ws`` and ``B×C×Ht×Wt`` (same C, any positions) → scalar, MSE over the
    ``B×C×C`` maps of cosine similarity between channels."""
    name = "channel_similarity_loss"
    _check_feature_maps(name, student, teacher)
    require_match(name, "number of channels", student, teacher, 1, _ADAPT)
    return kernels.channel_similarity(student, teacher, backend, accumulate)


def spatial_channel_similarity_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    backend: str = "auto",
    accumulate: str = DEFAULT_ACCUMULATE,
) -> torch.Tensor:
    """``B×C×H×W`` twice (same C and positions: adapt the student first) → scalar: the
    spatial plus the channel loss, the SPKD papers' best configuration. The ``triton``
    backend reads each feature map once for both."""
    name = "spatial_channel_similarity_loss"
    _check_feature_maps(name, student, teacher)
    require_match(name, "spatial size", student, teacher, slice(2, None), _SAME_POSITIONS)
    require_match(name, "number of channels", student, teacher, 1, _ADAPT)
    return kernels.spatial_channel_similarity(student, teacher, backend, accumulate)


class _SimilarityLoss(DistillationLoss):
    """Module form of a similarity loss with a fixed backend and accumulation."""

    function = staticmethod(spatial_similarity_loss)

    def __init__(self, backend: str = "auto", accumulate: str = DEFAULT_ACCUMULATE):
        super().__init__()
        self.backend = backend
        self.accumulate = accumulate

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self.function(student, teacher, self.backend, self.accumulate)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, accumulate={self.accumulate!r}"


@register_loss("batch_similarity")
class BatchSimilarityLoss(_SimilarityLoss):
    """Module form of :func:`batch_similarity_loss` (``gather``: the global batch's map
    in multi-process training)."""

    function = staticmethod(batch_similarity_loss)

    def __init__(self, backend: str = "auto", accumulate: str = DEFAULT_ACCUMULATE,
                 gather: bool = False):
        super().__init__(backend, accumulate)
        self.gather = gather

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return batch_similarity_loss(student, teacher, self.backend, self.accumulate,
                                     self.gather)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gather={self.gather}"


@register_loss("spatial_similarity")
class SpatialSimilarityLoss(_SimilarityLoss):
    """Module form of :func:`spatial_similarity_loss`."""

    function = staticmethod(spatial_similarity_loss)


@register_loss("channel_similarity")
class ChannelSimilarityLoss(_SimilarityLoss):
    """Module form of :func:`channel_similarity_loss`."""

    function = staticmethod(channel_similarity_loss)


@register_loss("spatial_channel_similarity")
class SpatialChannelSimilarityLoss(_SimilarityLoss):
    """Module form of :func:`spatial_channel_similarity_loss`."""

    function = staticmethod(spatial_channel_similarity_loss)
