"""Distillation losses: functional forms (student first, teacher second), thin
``nn.Module`` wrappers, and a registry from name to module class."""

from __future__ import annotations

import difflib

from torch import nn

from kdkit.losses.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from kdkit.losses.fsp import FSPLoss, fsp_loss, fsp_matrix
from kdkit.losses.hinton import HintonKDLoss, hinton_kd_loss
from kdkit.losses.ofd import OFDLoss, ofd_layer_weights, ofd_loss, ofd_margin
from kdkit.losses.similarity import (
    BatchSimilarityLoss,
    ChannelSimilarityLoss,
    SpatialChannelSimilarityLoss,
    SpatialSimilarityLoss,
    batch_similarity_loss,
    channel_similarity_loss,
    spatial_channel_similarity_loss,
    spatial_similarity_loss,
)

__all__ = [
    "LOSSES",
    "register_loss",
    "build_loss",
    "attention_map",
    "attention_transfer_loss",
    "batch_similarity_loss",
    "channel_similarity_loss",
    "fsp_loss",
    "fsp_matrix",
    "hinton_kd_loss",
    "ofd_layer_weights",
    "ofd_loss",
    "ofd_margin",
    "spatial_similarity_loss",
    "spatial_channel_similarity_loss",
    "AttentionTransferLoss",
    "BatchSimilarityLoss",
    "ChannelSimilarityLoss",
    "FSPLoss",
    "HintonKDLoss",
    "OFDLoss",
    "SpatialSimilarityLoss",
    "SpatialChannelSimilarityLoss",
]

LOSSES: dict[str, type[nn.Module]] = {
    "hinton": HintonKDLoss,
    "attention_transfer": AttentionTransferLoss,
    "fsp": FSPLoss,
    "ofd": OFDLoss,
    "batch_similarity": BatchSimilarityLoss,
    "spatial_similarity": SpatialSimilarityLoss,
    "channel_similarity": ChannelSimilarityLoss,
    "spatial_channel_similarity": SpatialChannelSimilarityLoss,
}


def register_loss(name: str):
    """Class decorator adding a loss module to :data:`LOSSES` under ``name``."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name]})")
        LOSSES[name] = cls
        return cls

    return add


def build_loss(name: str, **kwargs) -> nn.Module:
    """Instantiate the registered loss ``name`` with ``kwargs``."""
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown loss {name!r}; registered: {', '.join(LOSSES)}.{hint}")
    try:
        return LOSSES[name](**kwargs)
    except TypeError as error:
        raise TypeError(f"bad arguments for loss {name!r}: {error}") from None
