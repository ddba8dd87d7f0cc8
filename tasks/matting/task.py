"""The matting task for kdkit's training loop, evaluation and prediction.

Config sections (see ``tasks/matting/configs/``):

    model:  {name: dim_teacher | dim_student | timm, adapters: false, encoder: resnet18}
    data:   {kind: synthetic | folder | composition1k, ...}  (:class:`MattingData`)
    loss:   {alpha: 1.0, composition: 0.0, laplacian: 0.0, teacher_alpha: 0.0}
            (:class:`MattingLoss`)

A batch is a dict with ``image`` (``B×3×H×W`` in [0, 1]), ``alpha`` (``B×1×H×W``),
``trimap`` (``B×1×H×W`` with values 0 / 128 / 255) and, when the data has them and
``data.fields`` names them (the default does), ``fg`` and ``bg``: only the composition
loss uses them, so a run without it can leave them out and load less. Datasets whose
trimaps mark the unknown region with another value (``data.unknown_value``, e.g. 102) are
checked in their own convention and mapped to 128 on loading, so losses and metrics need
no such setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdkit.config import ConfigError, OneOf, Range, from_mapping, register_checks
from kdkit.data import keep_fields, source_pairs
from kdkit.errors import DataError
from kdkit.rescale import at_long_side
from tasks.matting import data as matting_data
from tasks.matting.losses import alpha_prediction_loss, composition_loss, laplacian_loss
from tasks.matting.metrics import matting_metrics
from tasks.matting.models import (
    DIM,
    DIMSpec,
    TimmMatting,
    dim_student,
    dim_teacher,
    network_input,
)

__all__ = ["MattingModel", "MattingData", "MattingLoss", "MattingTask", "predict_alpha",
           "with_known_regions"]


@dataclass
class MattingModel:
    """``model:`` section. ``dim`` builds a DIM of any widths from ``encoder`` (channels of
    each block's 3×3 convs) and ``decoder`` (5×5 channels, deepest first)."""

    name: str = "dim_student"  # dim_teacher | dim_student | dim | timm
    adapters: bool = False  # dim_student: the papers' four 1×1 adapters
    encoder_channels: list[list[int]] | None = None  # dim only
    decoder_channels_dim: list[int] | None = None  # dim only
    adapter_channels: list[int] | None = None  # dim only: adapters of blocks 2–5
    refine_channels: int = 0  # dim only: DIM's refinement stage (0: none)
    decoder_relu: bool = False  # dim only: DIM's own decoder, a ReLU after each stage
    encoder: str = "resnet18"  # timm only
    decoder_channels: int = 64  # timm only
    pretrained: bool = False  # timm only; needs weights available locally


register_checks(MattingModel, name=OneOf(("dim_teacher", "dim_student", "dim", "timm")),
                decoder_channels=Range(1), refine_channels=Range(0))


#: The arrays a batch can carry; image, alpha and trimap are always needed.
FIELDS = ("image", "alpha", "trimap", "fg", "bg")
REQUIRED_FIELDS = ("image", "alpha", "trimap")


@dataclass(frozen=True)
class BackgroundsCheck:
    """``data.backgrounds``: natural, procedural, or an existing folder of photos."""

    choices: tuple[str, ...] = matting_data.BACKGROUNDS

    def allows(self, value: Any) -> bool:
        return value in self.choices or Path(value).expanduser().is_dir()

    def problem(self, key: str, value: Any) -> str:
        return (f"{OneOf(self.choices).problem(key, value)}, or a folder of .jpg/.png "
                f"photos ({value!r} is not a folder)")


@dataclass
class MattingData:
    """``data:`` section. ``synthetic`` generates samples (train and test from disjoint
    seeds); ``folder`` reads ``image/ alpha/ trimap/`` folders; ``composition1k`` the
    Adobe Composition-1k layout (``root`` for training, ``test_root`` for testing).

    ``fields``: the arrays batches carry (when the data has them); ``[image, alpha,
    trimap]`` leaves out fg and bg, which only the composition loss uses. ``pool``
    (synthetic only): make this many training samples once, with every core, and draw
    random views of them (:class:`kdkit.data.SeededDataset`); ``null`` makes every
    training sample anew."""

    kind: str = "synthetic"
    train_length: int = 2000
    test_length: int = 50
    size: int = 512
    root: str | None = None
    test_root: str | None = None
    crop_sizes: list[int] = field(default_factory=lambda: [320, 480, 640])
    output_size: int = 320
    unknown_value: int = 128
    bg_per_fg: int | None = None  # composition1k: the official 100 (train) / 20 (test)
    fields: list[str] = field(default_factory=lambda: list(FIELDS))
    pool: int | None = None  # synthetic: training samples made once and reused
    backgrounds: str = "natural"  # synthetic: natural | procedural | a folder of photos
    # training trimaps: erosion kernel sizes [low, high] in pixels (DIM's, for 1000-px photos)
    trimap_kernel: list[int] = field(default_factory=lambda: [1, 30])


register_checks(
    MattingData,
    kind=OneOf(("synthetic", "folder", "composition1k")),
    train_length=Range(1),
    test_length=Range(1),
    crop_sizes=Range(1),
    output_size=Range(1),
    unknown_value=Range(1, 254, note="0 and 255 are the definite background and foreground"),
    bg_per_fg=Range(1, note="or null for the official 100 (train) / 20 (test)"),
    fields=OneOf(FIELDS),
    pool=Range(1, note="or null to make every training sample anew"),
    backgrounds=BackgroundsCheck(),
    trimap_kernel=Range(1),
)


@dataclass
class MattingLoss:
    """``loss:`` section: weights of the alpha-prediction loss against the ground truth,
    the composition loss, the Laplacian loss against the ground truth, and the
    alpha-prediction loss against the teacher's alpha (the SPKD papers' objective is
    ``alpha: 0.5, teacher_alpha: 0.5`` plus feature terms)."""

    alpha: float = 1.0
    composition: float = 0.0
    laplacian: float = 0.0
    teacher_alpha: float = 0.0


UNKNOWN = 128  # the unknown value inside the task, whatever the data files use


class _CanonicalTrimap:
    """Wraps a transform: its output trimap's ``unknown_value`` becomes :data:`UNKNOWN`."""

    def __init__(self, transform, unknown_value: int):
        self.transform, self.unknown_value = transform, unknown_value

    def __call__(self, sample: dict) -> dict:
        out = self.transform(sample)
        if self.unknown_value != UNKNOWN:
            trimap = out["trimap"]
            out["trimap"] = torch.where(trimap == self.unknown_value, UNKNOWN, trimap)
        return out


class _KeepFields:
    """Wraps a transform: it sees only the array ``fields`` of a sample."""

    def __init__(self, transform, fields: list[str]):
        self.transform, self.fields = transform, fields

    def __call__(self, sample: dict) -> dict:
        return self.transform(keep_fields(sample, self.fields))


def _checked_data(spec: dict[str, Any]) -> MattingData:
    """The ``data:`` section, with the fields the task always needs and a pool only where
    samples are generated."""
    data = from_mapping(MattingData, spec, "data")
    missing = [name for name in REQUIRED_FIELDS if name not in data.fields]
    if missing:
        raise ConfigError(f"data.fields must hold {', '.join(REQUIRED_FIELDS)}, found "
                          f"{data.fields}; add {', '.join(missing)}")
    if data.pool is not None and data.kind != "synthetic":
        raise ConfigError(f"data.pool applies to synthetic data, found data.kind "
                          f"{data.kind!r}; remove data.pool (folder samples are read, not "
                          "made)")
    if len(data.trimap_kernel) != 2 or data.trimap_kernel[0] > data.trimap_kernel[1]:
        raise ConfigError(f"data.trimap_kernel is [low, high] with low <= high (erosion "
                          f"kernel sizes in pixels), found {data.trimap_kernel}")
    return data


@torch.no_grad()
def predict_alpha(model: nn.Module, image: torch.Tensor, trimap: torch.Tensor,
                  long_side: int | None = None) -> torch.Tensor:
    """``B×3×H×W`` RGB in [0, 1] and ``B×1×H×W`` trimap (0 / 128 / 255) → ``B×1×H×W``
    alpha with the trimap's known pixels. With ``long_side`` the network sees the image
    resized so that its longer side has that many pixels (area averaging; the trimap by
    nearest neighbour) and its alpha is resized back (bilinear): a model trained on small
    images then sees a large photo at the scale it learned."""
    alpha = at_long_side(lambda x, t: model(network_input(x, t)), image, long_side, trimap)
    return with_known_regions(alpha.clamp(0, 1), trimap)


def with_known_regions(alpha: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    """``B×1×H×W`` alpha with the trimap's definite background (0) and foreground (255)
    pixels set to 0 and 1."""
    return torch.where(trimap == 0, 0.0, torch.where(trimap == 255, 1.0, alpha))



class MattingTask:
    """Deep Image Matting on synthetic or folder data, with the four standard metrics."""

    primary_metric = ("SAD", "lower")
    # as tasks/matting/metrics.py computes them over the unknown region; MSE is not the
    # "×10⁻³" some papers print
    metric_units = {"SAD": "sum ÷ 1000", "MSE": "mean per pixel", "Grad": "sum ÷ 1000",
                    "Conn": "sum ÷ 1000"}

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        model = from_mapping(MattingModel, spec, "model")
        if model.name == "dim_teacher":
            return dim_teacher()
        if model.name == "dim_student":
            return dim_student(adapters=model.adapters)
        if model.name == "dim":
            if not model.encoder_channels or not model.decoder_channels_dim:
                raise ConfigError("model.name 'dim' needs model.encoder_channels and "
                                  "model.decoder_channels_dim")
            spec = DIMSpec(tuple(tuple(block) for block in model.encoder_channels),
                           tuple(model.decoder_channels_dim), model.refine_channels,
                           model.decoder_relu)
            return DIM(spec, adapter_channels=model.adapter_channels)
        return TimmMatting(model.encoder, model.decoder_channels, model.pretrained)  # timm

    def datasets(self, spec: dict[str, Any]) -> tuple[Dataset, Dataset]:
        data = _checked_data(spec)
        # training trimaps are redrawn from alpha, directly in the task's convention
        train_transform = matting_data.TrainTransform(
            crop_sizes=tuple(data.crop_sizes), output_size=data.output_size,
            unknown_value=UNKNOWN, trimap_kernel=tuple(data.trimap_kernel))
        eval_transform = _CanonicalTrimap(
            matting_data.EvalTransform(unknown_value=data.unknown_value), data.unknown_value)
        if data.kind == "synthetic":
            return (
                matting_data.SyntheticMatting("train", data.train_length, data.size,
                                              data.unknown_value, train_transform, data.pool,
                                              data.fields, data.backgrounds),
                matting_data.SyntheticMatting("test", data.test_length, data.size,
                                              data.unknown_value, eval_transform,
                                              fields=data.fields,
                                              backgrounds=data.backgrounds),
            )
        if data.root is None or data.test_root is None:
            raise ConfigError(f"data.kind {data.kind!r} needs data.root and data.test_root")
        train_transform = _KeepFields(train_transform, data.fields)
        eval_transform = _KeepFields(eval_transform, data.fields)
        if data.kind == "folder":
            return (
                matting_data.ImageFolderMatting(data.root, data.unknown_value, train_transform),
                matting_data.ImageFolderMatting(data.test_root, data.unknown_value,
                                                eval_transform),
            )
        return (  # composition1k (the kinds are checked when the section is read)
            matting_data.Composition1kMatting(data.root, "train", data.unknown_value,
                                              train_transform, data.bg_per_fg),
            matting_data.Composition1kMatting(data.test_root, "test", data.unknown_value,
                                              eval_transform, data.bg_per_fg),
        )

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor]:
        return (network_input(batch["image"], batch["trimap"]),)

    def losses(self, prediction, batch, teacher_prediction, spec) -> dict[str, torch.Tensor]:
        weights = from_mapping(MattingLoss, spec, "loss")
        trimap = batch["trimap"]
        terms = {}
        if weights.alpha:
            terms["alpha"] = weights.alpha * alpha_prediction_loss(
                prediction, batch["alpha"], trimap, UNKNOWN)
        if weights.composition:
            if "fg" not in batch or "bg" not in batch:
                raise ConfigError("loss.composition needs batches with foreground and "
                                  "background: data with fg and bg (synthetic or "
                                  "composition1k) and both in data.fields; or set "
                                  "loss.composition to 0")
            terms["composition"] = weights.composition * composition_loss(
                prediction, batch["image"], batch["fg"], batch["bg"], trimap, UNKNOWN)
        if weights.laplacian:
            terms["laplacian"] = weights.laplacian * laplacian_loss(
                prediction, batch["alpha"], trimap, UNKNOWN)
        if weights.teacher_alpha:
            if teacher_prediction is None:
                raise ConfigError("loss.teacher_alpha needs a teacher (a distillation run)")
            terms["teacher_alpha"] = weights.teacher_alpha * alpha_prediction_loss(
                prediction, teacher_prediction, trimap, UNKNOWN)
        if not terms:
            raise ConfigError("the loss section sets every weight to 0: nothing to train")
        return terms

    def metrics(self, spec: dict[str, Any]):
        if spec:
            raise ConfigError(f"the matting task's metrics take no settings, found {spec}")
        return matting_metrics(unknown_value=UNKNOWN)

    def update_metrics(self, metrics, prediction, batch) -> None:
        metrics.update(prediction, batch["alpha"], batch["trimap"])

    def flops_inputs(self, height: int, width: int) -> tuple[torch.Tensor]:
        return (torch.zeros(1, 4, height, width),)

    def example_panels(self, batch, predictions) -> list[tuple[str, np.ndarray]]:
        """Image, trimap, ground truth, then each prediction with the trimap's known pixels
        filled in (as ``predict`` writes them; the metrics only see the unknown region)."""
        def gray(tensor):
            return tensor[0, 0].float().clamp(0, 1).cpu().numpy()

        trimap = batch["trimap"]
        panels = [("image", batch["image"][0].permute(1, 2, 0).float().cpu().numpy()),
                  ("trimap", gray(trimap / 255)), ("ground truth", gray(batch["alpha"]))]
        return panels + [(name, gray(with_known_regions(alpha, trimap)))
                         for name, alpha in predictions.items()]

    @torch.no_grad()
    def predict(self, model: nn.Module, images: str, trimaps: str | None, output: str,
                data: dict[str, Any], device: torch.device,
                long_side: int | None = None) -> list[Path]:
        """Alpha PNGs at full resolution, named like the images; the trimap's known pixels
        are copied into the prediction (0 or 1). ``long_side``: the network sees each image
        at that size (see :func:`predict_alpha`)."""
        if trimaps is None:
            raise ConfigError("matting needs a trimap per image: pass --guide FILE_OR_FOLDER")
        unknown = from_mapping(MattingData, data, "data").unknown_value
        out_dir = Path(output)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        model.eval()
        for image_path, trimap_path in source_pairs(images, trimaps):
            image = matting_data.read_image(image_path)
            trimap = matting_data.read_trimap(trimap_path, unknown)
            trimap = np.where(trimap == unknown, UNKNOWN, trimap).astype(np.uint8)
            if trimap.shape != image.shape[:2]:
                raise DataError(f"{trimap_path} is {trimap.shape[1]}×{trimap.shape[0]} but "
                                 f"{image_path} is {image.shape[1]}×{image.shape[0]}")
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().div(255).to(device)
            t = torch.from_numpy(trimap)[None, None].float().to(device)
            alpha = predict_alpha(model, x, t, long_side)[0, 0].float().cpu().numpy()
            target = out_dir / f"{image_path.stem}.png"
            if not cv2.imwrite(str(target), np.round(alpha * 255).astype(np.uint8)):
                raise OSError(f"could not write {target}")
            written.append(target)
        return written

    def write_synthetic(self, out: str, n: int, size: int, seed: int,
                        backgrounds: str | None = None) -> Path:
        return matting_data.write_synthetic_folder(out, n, size, seed0=seed,
                                                   backgrounds=backgrounds or "natural")

    def training_free(self) -> dict:
        """Closed-form and KNN matting (pymatting; :mod:`tasks.matting.classical`)."""
        from tasks.matting.classical import classical_methods

        return classical_methods()
