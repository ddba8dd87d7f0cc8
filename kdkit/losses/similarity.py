"""Similarity-preserving KD (SPKD): batch, spatial and channel similarity maps.

All three compare a student map with the teacher's by the mean squared error over every
map entry. See ``docs/methods.md`` for the definitions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdkit.kernels import batch_similarity_map, channel_similarity_map, spatial_similarity_map
from kdkit.losses._shapes import require_match, require_min_dims

__all__ = [
    "batch_similarity_loss",
    "spatial_similarity_loss",
    "channel_similarity_loss",
    "BatchSimilarityLoss",
    "SpatialSimilarityLoss",
    "ChannelSimilarityLoss",
]


def batch_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Tung & Mori: ``B×…`` and ``B×…`` (any sizes after B) → scalar, MSE over ``B·B``."""
    name = "batch_similarity_loss"
    require_min_dims(name, student, "student", 2, "B×…")
    require_min_dims(name, teacher, "teacher", 2, "B×…")
    require_match(name, "batch size", student, teacher, 0, "Pass the same batch to both models.")
    if student.shape[0] < 2:
        raise ValueError(
            f"{name}: a batch similarity map needs at least 2 samples, found a batch of "
            f"{student.shape[0]}; use a larger batch or drop the batch term"
        )
    return F.mse_loss(batch_similarity_map(student), batch_similarity_map(teacher.detach()))


def spatial_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``B×Cs×H×W`` and ``B×Ct×H×W`` (any channels) → scalar, MSE over the ``B×N×N`` maps
    of cosine similarity between positions."""
    name = "spatial_similarity_loss"
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_min_dims(name, teacher, "teacher", 3, "B×C×H×W")
    require_match(name, "batch size", student, teacher, 0, "Pass the same batch to both models.")
    require_match(
        name, "spatial size", student, teacher, slice(2, None),
        "Distil layers of equal stride, or resize one feature map to the other's size.",
    )
    return F.mse_loss(spatial_similarity_map(student), spatial_similarity_map(teacher.detach()))


def channel_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``B×C×Hs×Ws`` and ``B×C×Ht×Wt`` (same C, any positions) → scalar, MSE over the
    ``B×C×C`` maps of cosine similarity between channels."""
    name = "channel_similarity_loss"
    require_min_dims(name, student, "student", 3, "B×C×H×W")
    require_min_dims(name, teacher, "teacher", 3, "B×C×H×W")
    require_match(name, "batch size", student, teacher, 0, "Pass the same batch to both models.")
    require_match(
        name, "number of channels", student, teacher, 1,
        "Add an adapter (e.g. 'conv1x1') that maps student channels to teacher channels.",
    )
    return F.mse_loss(channel_similarity_map(student), channel_similarity_map(teacher.detach()))


class BatchSimilarityLoss(nn.Module):
    """Module form of :func:`batch_similarity_loss`."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return batch_similarity_loss(student, teacher)


class SpatialSimilarityLoss(nn.Module):
    """Module form of :func:`spatial_similarity_loss`."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return spatial_similarity_loss(student, teacher)


class ChannelSimilarityLoss(nn.Module):
    """Module form of :func:`channel_similarity_loss`."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return channel_similarity_loss(student, teacher)
