"""Segmentation metrics through torchmetrics: mean IoU and pixel accuracy.

Both accumulate over every update (so over a whole test set they are the dataset-level
figures: per-class intersections and unions summed over images, then averaged over the
classes that occur in the ground truth or the prediction). Pixels labelled
``ignore_index`` count in neither.
"""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

__all__ = ["segmentation_metrics", "update_segmentation_metrics"]


def segmentation_metrics(classes: int, ignore_index: int = 255) -> MetricCollection:
    """``mIoU`` (macro Jaccard index) and ``pixel_acc`` (micro accuracy)."""
    return MetricCollection({
        "mIoU": MulticlassJaccardIndex(classes, average="macro", ignore_index=ignore_index),
        "pixel_acc": MulticlassAccuracy(classes, average="micro", ignore_index=ignore_index),
    })


def update_segmentation_metrics(metrics: MetricCollection, logits: torch.Tensor,
                                mask: torch.Tensor) -> None:
    """Add ``B×K×H×W`` logits (arg-maxed over ``K``) against a ``B×H×W`` integer mask."""
    if logits.dim() != 4 or mask.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"expected B×K×H×W logits and a B×H×W mask, got logits "
                         f"{tuple(logits.shape)} and mask {tuple(mask.shape)}")
    metrics.update(logits.argmax(dim=1), mask.long())
