"""Distillation losses: functional forms (student first, teacher second), thin module
wrappers (:class:`DistillationLoss`, the contract the Distiller relies on), and the
registry from name to module class (:func:`register_loss`, :func:`build_loss`)."""

from __future__ import annotations

from kdkit.losses.affinity import (
    CrossImageAffinityLoss,
    PairwiseAffinityLoss,
    cross_image_affinity_loss,
    pairwise_affinity_loss,
)
from kdkit.losses.attention import AttentionTransferLoss, attention_map, attention_transfer_loss
from kdkit.losses.cwd import CWDLoss, cwd_loss
from kdkit.losses.dist import DISTLoss, dist_loss, pearson
from kdkit.losses.fitnet import FitNetLoss, fitnet_loss
from kdkit.losses.fsp import FSPLoss, fsp_loss, fsp_matrix
from kdkit.losses.hinton import HintonKDLoss, hinton_kd_loss
from kdkit.losses.mgd import MGDLoss, mgd_generator, mgd_loss, mgd_mask
from kdkit.losses.ofd import OFDLoss, ofd_layer_weights, ofd_loss, ofd_margin
from kdkit.losses.protocol import DistillationLoss, bind_teacher, takes_lists
from kdkit.losses.registry import LOSSES, UnknownLossError, build_loss, register_loss
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
    "DistillationLoss",
    "UnknownLossError",
    "register_loss",
    "build_loss",
    "bind_teacher",
    "takes_lists",
    "attention_map",
    "attention_transfer_loss",
    "batch_similarity_loss",
    "channel_similarity_loss",
    "cross_image_affinity_loss",
    "cwd_loss",
    "dist_loss",
    "fitnet_loss",
    "fsp_loss",
    "fsp_matrix",
    "hinton_kd_loss",
    "mgd_generator",
    "mgd_loss",
    "mgd_mask",
    "ofd_layer_weights",
    "ofd_loss",
    "ofd_margin",
    "pairwise_affinity_loss",
    "pearson",
    "spatial_similarity_loss",
    "spatial_channel_similarity_loss",
    "AttentionTransferLoss",
    "BatchSimilarityLoss",
    "ChannelSimilarityLoss",
    "CrossImageAffinityLoss",
    "CWDLoss",
    "DISTLoss",
    "FitNetLoss",
    "FSPLoss",
    "HintonKDLoss",
    "MGDLoss",
    "OFDLoss",
    "PairwiseAffinityLoss",
    "SpatialSimilarityLoss",
    "SpatialChannelSimilarityLoss",
]
