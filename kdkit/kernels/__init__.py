"""Similarity-map computations behind the SPKD losses.

``reference`` materialises the maps exactly as defined (``docs/methods.md``).
"""

from kdkit.kernels.reference import (
    batch_similarity_map,
    channel_similarity_map,
    normalize_channels,
    normalize_positions,
    spatial_similarity_map,
)

__all__ = [
    "batch_similarity_map",
    "channel_similarity_map",
    "normalize_channels",
    "normalize_positions",
    "spatial_similarity_map",
]
