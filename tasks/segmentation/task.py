"""The semantic-segmentation task for kdkit's training loop, evaluation and prediction.

Config sections (see ``tasks/segmentation/configs/``):

    model:  {encoder: resnet18, classes: 6, decoder_channels: 64, encoder_args: {}}
    data:   {kind: synthetic | folder, classes: 6, ...}   (:class:`SegmentationData`)
    loss:   {ce: 1.0}                                    (:class:`SegmentationLoss`)

A batch is a dict with ``image`` (``B×3×H×W`` in [0, 1]) and ``mask`` (``B×H×W`` int64
class indices, 255 = ignore). Hinton's per-pixel KD is a distillation term on the
``logits`` tap (``{loss: hinton, student: logits, teacher: logits}``), so the task's own
loss is the cross-entropy against the ground truth alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from kdkit.config import ConfigError, OneOf, Range, from_mapping, register_checks
from kdkit.data import read_image, source_files
from kdkit.rescale import at_long_side
from tasks.segmentation import data as seg_data
from tasks.segmentation.metrics import segmentation_metrics, update_segmentation_metrics
from tasks.segmentation.models import SegmentationFPN

__all__ = ["SegmentationData", "SegmentationLoss", "SegmentationModel", "SegmentationTask"]


@dataclass
class SegmentationModel:
    """``model:`` section: a timm ``encoder`` (``encoder_args`` to ``timm.create_model``,
    e.g. ``{channels: [16, 32, 64, 128]}`` for a narrow ResNet) and an FPN
    head of ``decoder_channels`` predicting ``classes`` classes."""

    encoder: str = "resnet18"
    classes: int = 6
    decoder_channels: int = 64
    encoder_args: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = False  # needs the weights available locally


@dataclass
class SegmentationData:
    """``data:`` section. ``synthetic`` generates scenes (train and test from disjoint
    seeds); ``folder`` reads ``image/`` and ``mask/`` folders (``root`` for training,
    ``test_root`` for testing; masks as index or VOC-colour PNGs). ``pool`` (synthetic
    only): make this many training scenes once, with every core, and draw random views of
    them (:class:`kdkit.data.SeededDataset`); ``null`` makes every training scene anew."""

    kind: str = "synthetic"
    classes: int = 6
    train_length: int = 2000
    test_length: int = 50
    size: int = 128
    root: str | None = None
    test_root: str | None = None
    crop_size: int = 128
    scale_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    camouflage: bool = True  # synthetic: objects textured from the background's palette
    pool: int | None = None  # synthetic: training scenes made once and reused


register_checks(SegmentationModel, classes=Range(2), decoder_channels=Range(1))
register_checks(
    SegmentationData,
    kind=OneOf(("synthetic", "folder")),
    classes=Range(2),
    train_length=Range(1),
    test_length=Range(1),
    crop_size=Range(1),
    scale_range=Range(0, open_low=True),
    pool=Range(1, note="or null to make every training scene anew"),
)


@dataclass
class SegmentationLoss:
    """``loss:`` section: the weight of the per-pixel cross-entropy (255 ignored)."""

    ce: float = 1.0


class SegmentationTask:
    """Semantic segmentation with a timm-encoder FPN on synthetic or folder data, scored
    by mean IoU and pixel accuracy."""

    primary_metric = ("mIoU", "higher")
    metric_units = {"mIoU": "0–1", "pixel_acc": "0–1"}  # fractions, not percentages

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        model = from_mapping(SegmentationModel, spec, "model")
        return SegmentationFPN(model.encoder, model.classes, model.decoder_channels,
                               model.encoder_args, model.pretrained)

    def datasets(self, spec: dict[str, Any]) -> tuple[Dataset, Dataset]:
        data = from_mapping(SegmentationData, spec, "data")
        train_transform = seg_data.TrainTransform(data.crop_size, tuple(data.scale_range))
        eval_transform = seg_data.EvalTransform()
        if data.kind == "synthetic":
            return (
                seg_data.SyntheticSegmentation("train", data.train_length, data.size,
                                               data.classes, train_transform, data.camouflage,
                                               data.pool),
                seg_data.SyntheticSegmentation("test", data.test_length, data.size,
                                               data.classes, eval_transform, data.camouflage),
            )
        if data.pool is not None:  # folder, the only other kind
            raise ConfigError("data.pool applies to synthetic data, found data.kind 'folder'; "
                              "remove data.pool (folder samples are read, not made)")
        if data.root is None or data.test_root is None:
            raise ConfigError("data.kind 'folder' needs data.root and data.test_root")
        return (seg_data.FolderSegmentation(data.root, data.classes, train_transform),
                seg_data.FolderSegmentation(data.test_root, data.classes, eval_transform))

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        return (batch["image"],)

    def losses(self, prediction, batch, teacher_prediction, spec) -> dict[str, torch.Tensor]:
        weights = from_mapping(SegmentationLoss, spec, "loss")
        if not weights.ce:
            raise ConfigError("loss.ce is 0 and the task has no other loss: nothing to train "
                              "against the ground truth")
        mask = batch["mask"]
        labelled = mask[mask != seg_data.IGNORE_INDEX]
        if labelled.numel() and int(labelled.max()) >= prediction.shape[1]:
            raise ConfigError(
                f"the masks hold class {int(labelled.max())} but the model predicts "
                f"{prediction.shape[1]} classes; set model.classes to data.classes")
        ce = F.cross_entropy(prediction.float(), mask, ignore_index=seg_data.IGNORE_INDEX)
        return {"ce": weights.ce * ce}

    def metrics(self, spec: dict[str, Any]):
        if set(spec) - {"classes"}:
            raise ConfigError(f"the segmentation metrics take only 'classes', found {spec}")
        if "classes" not in spec:
            raise ConfigError("the segmentation task needs metrics: {classes: K} (the number "
                              "of classes, as data.classes)")
        return segmentation_metrics(int(spec["classes"]), seg_data.IGNORE_INDEX)

    def update_metrics(self, metrics, prediction, batch) -> None:
        update_segmentation_metrics(metrics, prediction, batch["mask"])

    def flops_inputs(self, height: int, width: int) -> tuple[torch.Tensor]:
        return (torch.zeros(1, 3, height, width),)

    def example_panels(self, batch, predictions) -> list[tuple[str, np.ndarray]]:
        """Image, ground truth, then each model's arg-max labels, in VOC colours."""
        def colours(labels: torch.Tensor) -> np.ndarray:
            return seg_data.colourise(labels[0].cpu().numpy().astype(np.uint8)) / 255.0

        panels = [("image", batch["image"][0].permute(1, 2, 0).float().cpu().numpy()),
                  ("ground truth", colours(batch["mask"]))]
        return panels + [(name, colours(logits.argmax(dim=1)))
                         for name, logits in predictions.items()]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: str, guides: str | None, output: str,
                data: dict[str, Any], device: torch.device,
                long_side: int | None = None) -> list[Path]:
        """Label maps at full resolution as VOC-coloured PNGs, named like the images; with
        ``long_side`` the network sees each image resized so that its longer side has that
        many pixels, and its class scores are resized back (bilinear) before the argmax."""
        if guides is not None:
            raise ConfigError("segmentation takes no per-image guide; drop --guide")
        out_dir = Path(output)
        written = []
        model.eval()
        for image_path in source_files(images):
            image = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None]
            image = image.float().div(255).to(device)
            logits = at_long_side(lambda x, _: model(x), image, long_side)
            target = out_dir / f"{image_path.stem}.png"
            seg_data.write_mask(target, logits.argmax(dim=1)[0].cpu().numpy().astype(np.uint8))
            written.append(target)
        return written

    def write_synthetic(self, out: str, n: int, size: int, seed: int,
                        backgrounds: str | None = None) -> Path:
        if backgrounds is not None:
            raise ConfigError("--backgrounds applies to the matting task; leave it out for "
                              "segmentation")
        return seg_data.write_synthetic_folder(out, n, size, seed0=seed)
