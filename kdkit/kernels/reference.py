"""The similarity maps of SPKD, materialised exactly as defined.

A feature map is ``B×C×S…`` (``S…`` any spatial dims, ``N`` their product). Half-precision
inputs are computed in float32. A backend module (:mod:`kdkit.kernels.backends`): these
functions take no ``accumulate``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkit.kernels.common import EPS, at_least_float32, batch_map_from_gram

__all__ = [
    "batch_similarity_map",
    "spatial_similarity_map",
    "channel_similarity_map",
    "batch_similarity",
    "spatial_similarity",
    "channel_similarity",
]

def _flat(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``B×C×N`` in at least float32."""
    return at_least_float32(f.flatten(2))


def normalize_positions(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``B×C×N``: each position's C-vector divided by ``(‖·‖₂ + 1e-7)``."""
    f = _flat(f)
    return f / (f.norm(dim=1, keepdim=True) + EPS)


def normalize_channels(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``B×C×N``: each channel's N-vector divided by ``(‖·‖₂ + 1e-7)``."""
    f = _flat(f)
    return f / (f.norm(dim=2, keepdim=True) + EPS)


def batch_similarity_map(f: torch.Tensor) -> torch.Tensor:
    """``B×…`` → ``B×B``: ``G = Q Qᵀ`` with ``Q = f.view(B, -1)``, rows L2-normalised."""
    q = at_least_float32(f.flatten(1))
    return batch_map_from_gram(q @ q.t())


def spatial_similarity_map(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``B×N×N``: cosine similarity between every pair of positions."""
    fn = normalize_positions(f)
    return fn.transpose(1, 2) @ fn


def channel_similarity_map(f: torch.Tensor) -> torch.Tensor:
    """``B×C×S…`` → ``B×C×C``: cosine similarity between every pair of channels."""
    fn = normalize_channels(f)
    return fn @ fn.transpose(1, 2)


def batch_similarity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the materialised ``B×B`` batch maps."""
    return F.mse_loss(batch_similarity_map(student), batch_similarity_map(teacher.detach()))


def spatial_similarity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the materialised ``B×N×N`` spatial maps."""
    return F.mse_loss(spatial_similarity_map(student), spatial_similarity_map(teacher.detach()))


def channel_similarity(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between the materialised ``B×C×C`` channel maps."""
    return F.mse_loss(channel_similarity_map(student), channel_similarity_map(teacher.detach()))
