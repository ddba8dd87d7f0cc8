"""Matting networks: Deep Image Matting (DIM) teacher and student, and a timm-encoder model.

DIM (SegNet-style, as both SPKD and DCP papers use it): input ``B×4×H×W`` (RGB normalised
with ImageNet mean/std, plus trimap/255), output ``B×1×H×W`` alpha through a sigmoid. Every
encoder conv is 3×3 conv → BN → ReLU and every encoder block ends in a 2×2 max-pool that
keeps its indices; every decoder stage unpools with the matching indices and applies a 5×5
conv → BN (no ReLU). No skip connections; the SPKD models have no refinement stage, and
``DIMSpec.refine`` adds DIM's own (:class:`Refinement`: full-resolution convs on the input and
the coarse alpha); ``DIMSpec.decoder_relu`` adds DIM's own ReLU after each decoder stage but
the last. Both DIM sizes come from one :class:`DIMSpec`, so other widths and depths
are a config change.

Stable module names (for :class:`kdkit.Distiller` terms):

    conv{k}.out        encoder block k after pooling ("conv2".."conv5" are the distilled
                       layers); conv{k}.adapter: its 1×1 adapter, when the model has them
    conv{k}.units.{j}  the j-th conv → BN → ReLU of block k (``.conv``, ``.bn``, ``.relu``);
                       the BN of the last unit is the OFD point of block k
    deconv{k}          decoder stage k (deconv5 is the deepest), output after its BN (and
                       its ReLU, ``deconv{k}.relu``, with ``decoder_relu``)
    refine             the refinement stage, when the spec has one (its output: the
                       correction of the alpha's logit)

Inputs of any size are padded (reflect) to a multiple of 32 and the output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DIMSpec",
    "TEACHER_SPEC",
    "STUDENT_SPEC",
    "DIM",
    "Refinement",
    "TimmMatting",
    "dim_teacher",
    "dim_student",
    "pad_to_multiple",
    "network_input",
]

MULTIPLE = 32


@dataclass(frozen=True)
class DIMSpec:
    """Encoder blocks (channels of each 3×3 conv) and decoder stages (5×5 conv channels,
    deepest first; the last is the output channel); ``refine``: the channels of DIM's
    refinement stage (0: none, the SPKD papers' models); ``decoder_relu``: a ReLU after
    each decoder stage but the last, as in DIM's own decoder (the SPKD papers' has none, so
    their decoder is linear between the unpoolings)."""

    encoder: tuple[tuple[int, ...], ...]
    decoder: tuple[int, ...]
    refine: int = 0
    decoder_relu: bool = False

    def __post_init__(self):
        if len(self.encoder) != len(self.decoder):
            raise ValueError(
                f"DIMSpec needs one decoder stage per encoder block: found "
                f"{len(self.encoder)} blocks and {len(self.decoder)} stages"
            )
        if self.refine < 0:
            raise ValueError(f"DIMSpec.refine is a channel count (0 for no refinement "
                             f"stage), found {self.refine}")


TEACHER_SPEC = DIMSpec(
    encoder=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    decoder=(512, 256, 128, 64, 1),
)
STUDENT_SPEC = DIMSpec(
    encoder=((32,), (64,), (128,), (256, 256), (256, 256)),
    decoder=(256, 128, 64, 32, 1),
)
# blocks whose pooled output the SPKD papers distil, and the teacher channels there
DISTILLED_BLOCKS = (2, 3, 4, 5)


def pad_to_multiple(x: torch.Tensor, multiple: int = MULTIPLE) -> tuple[torch.Tensor, tuple]:
    """Reflect-pad ``B×C×H×W`` on the bottom and right to multiples of ``multiple``;
    returns the padded tensor and the original ``(H, W)``."""
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    if torch.jit.is_tracing():  # ONNX export: always pad, so any size works in the graph
        return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect"), (h, w)
    if pad_h or pad_w:
        mode = "reflect" if pad_h < h and pad_w < w else "replicate"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x, (h, w)


class ConvUnit(nn.Module):
    """3×3 conv → BN → ReLU (out of place, so the BN output can be recorded for OFD)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class EncoderBlock(nn.Module):
    """Conv units then a 2×2 max-pool: ``B×Cin×H×W`` (even H, W) → (``B×C×H/2×W/2``,
    indices)."""

    def __init__(self, in_channels: int, channels: Sequence[int], adapter_to: int | None):
        super().__init__()
        widths = [in_channels, *channels]
        self.units = nn.Sequential(*(ConvUnit(a, b) for a, b in zip(widths, widths[1:])))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.out = nn.Identity()  # a name for the pooled output
        self.adapter = None if adapter_to is None else nn.Conv2d(channels[-1], adapter_to, 1)

    def forward(self, x: torch.Tensor):
        x = self.units(x)
        pooled, indices = self.pool(x)
        pooled = self.out(pooled)
        if self.adapter is not None:
            self.adapter(pooled)  # recorded by hooks for distillation; not on the main path
        return pooled, indices


def exporting() -> bool:
    """Whether the model is being traced (``torch.jit.trace``, or ``torch.onnx.export``,
    which traces: :func:`kdkit.export.export_onnx`)."""
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def unpool2x_scatter(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """:func:`unpool2x` written as a scatter, which exports to ONNX (the unpooling op has no
    ONNX export); 1.8–2.5× slower than ``F.max_unpool2d`` on the CPU."""
    plane = torch.zeros_like(x).repeat(1, 1, 2, 2)  # shapes stay dynamic when traced
    flat = plane.flatten(2).scatter(2, indices.flatten(2), x.flatten(2))
    return flat.view_as(plane)


def unpool2x(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """2×2 max-unpooling to twice the size (exact here: inputs are padded to a multiple of
    32): ``B×C×h×w`` values and their pooling indices → ``B×C×2h×2w``. ``F.max_unpool2d``,
    or the same placement as a scatter while tracing for export (:func:`exporting`)."""
    if exporting():
        return unpool2x_scatter(x, indices)
    return F.max_unpool2d(x, indices, 2)


class DecoderStage(nn.Module):
    """Max-unpool with the encoder's indices, then 5×5 conv → BN, and a ReLU when ``relu``
    (DIM's own decoder; the SPKD papers' stages have none)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 5, padding=2)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU() if relu else None

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(unpool2x(x, indices)))
        return x if self.relu is None else self.relu(x)


class Refinement(nn.Module):
    """DIM's refinement stage (Xu et al. 2017, §4.2): three 3×3 conv units and a 3×3 conv at
    full resolution on the network input and the coarse alpha, ``B×(Cin+1)×H×W`` → a
    ``B×1×H×W`` correction of the alpha's logit, zero at initialisation (the stage starts
    as the identity)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        widths = [in_channels + 1, channels, channels, channels]
        self.units = nn.Sequential(*(ConvUnit(a, b) for a, b in zip(widths, widths[1:])))
        self.out = nn.Conv2d(channels, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        return self.out(self.units(torch.cat([x, coarse], dim=1)))


class DIM(nn.Module):
    """Deep Image Matting encoder–decoder: ``B×4×H×W`` → alpha ``B×1×H×W`` in (0, 1).

    ``adapter_channels`` (one per distilled block 2–5) adds 1×1 adapters with bias that map
    each distilled feature to the teacher's width, as the SPKD papers count them."""

    def __init__(self, spec: DIMSpec, in_channels: int = 4,
                 adapter_channels: Sequence[int] | None = None):
        super().__init__()
        self.spec = spec
        adapters = dict(zip(DISTILLED_BLOCKS, adapter_channels or ()))
        if adapter_channels is not None and len(adapter_channels) != len(DISTILLED_BLOCKS):
            raise ValueError(f"adapter_channels needs {len(DISTILLED_BLOCKS)} values (blocks "
                             f"2–5), found {len(adapter_channels)}")
        channels = in_channels
        for k, block in enumerate(spec.encoder, start=1):
            self.add_module(f"conv{k}", EncoderBlock(channels, block, adapters.get(k)))
            channels = block[-1]
        for k, out in zip(range(len(spec.decoder), 0, -1), spec.decoder):
            relu = spec.decoder_relu and k > 1  # the last stage gives the alpha's logit
            self.add_module(f"deconv{k}", DecoderStage(channels, out, relu))
            channels = out
        self.depth = len(spec.encoder)
        self.refine = Refinement(in_channels, spec.refine) if spec.refine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, tie_unpooling=False)

    def pruning_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same output, with each unpooling input tied (``+ 0·pooled``) to the pooled
        encoder feature whose indices it uses: the channel coupling that the integer indices
        hide from autograd, made visible for Torch-Pruning's tracing
        (:func:`kdkit.pruning.prune_channels`)."""
        return self._run(x, tie_unpooling=True)

    def _run(self, x: torch.Tensor, tie_unpooling: bool) -> torch.Tensor:
        expected = self.conv1.units[0].conv.in_channels
        if x.dim() != 4 or x.shape[1] != expected:
            raise ValueError(
                f"DIM takes B×{expected}×H×W inputs (RGB normalised with the ImageNet "
                f"statistics plus trimap/255: tasks.matting.models.network_input), got shape "
                f"{tuple(x.shape)}")
        x, (h, w) = pad_to_multiple(x)
        inputs, trail = x, []
        for k in range(1, self.depth + 1):
            x, indices = getattr(self, f"conv{k}")(x)
            trail.append((x, indices))
        for k in range(self.depth, 0, -1):
            pooled, indices = trail[k - 1]
            if tie_unpooling:
                x = x + 0 * pooled
            x = getattr(self, f"deconv{k}")(x, indices)
        if self.refine is not None:  # a correction of the logit: the alpha stays in (0, 1)
            x = x + self.refine(inputs, torch.sigmoid(x))
        return torch.sigmoid(x)[..., :h, :w]

    def distilled_layers(self) -> list[str]:
        """Module names of the pooled outputs of blocks 2–5 (conv2..conv5)."""
        return [f"conv{k}.out" for k in DISTILLED_BLOCKS]

    def adapter_layers(self) -> list[str]:
        """Module names of the adapters of blocks 2–5 (empty without adapters)."""
        return [f"conv{k}.adapter" for k in DISTILLED_BLOCKS
                if getattr(self, f"conv{k}").adapter is not None]

    def ofd_layers(self) -> list[str]:
        """Module names of the BN before the last ReLU of blocks 2–5 (OFD's teacher points)."""
        return [f"conv{k}.units.{len(self.spec.encoder[k - 1]) - 1}.bn"
                for k in DISTILLED_BLOCKS]


def dim_teacher() -> DIM:
    """The DIM teacher (VGG-16 encoder): 25,582,595 parameters."""
    return DIM(TEACHER_SPEC)


def dim_student(adapters: bool = False) -> DIM:
    """The DIM student (half width, fewer convs): 4,877,283 parameters; with the four 1×1
    adapters (64→128, 128→256, 256→512, 256→512, with bias) 5,181,795."""
    teacher_widths = [TEACHER_SPEC.encoder[k - 1][-1] for k in DISTILLED_BLOCKS]
    return DIM(STUDENT_SPEC, adapter_channels=teacher_widths if adapters else None)


class TimmMatting(nn.Module):
    """Any timm encoder (``features_only=True``, ``in_chans=4``) with a light decoder:
    from the deepest feature, repeatedly upsample ×2, add a 1×1 projection of the next
    shallower feature, and apply 3×3 conv → BN → ReLU; a last 3×3 conv at full resolution
    gives the alpha through a sigmoid. ``B×4×H×W`` → ``B×1×H×W``.

    Encoder features are recordable as ``encoder.<timm module name>``
    (:meth:`feature_layers`)."""

    def __init__(self, encoder: str = "resnet18", decoder_channels: int = 64,
                 pretrained: bool = False, in_channels: int = 4):
        super().__init__()
        self.encoder = timm.create_model(encoder, features_only=True, in_chans=in_channels,
                                         pretrained=pretrained)
        widths = self.encoder.feature_info.channels()
        self.projections = nn.ModuleList(nn.Conv2d(c, decoder_channels, 1) for c in widths)
        self.fuse = nn.ModuleList(ConvUnit(decoder_channels, decoder_channels) for _ in widths)
        self.head = nn.Conv2d(decoder_channels, 1, 3, padding=1)

    def feature_layers(self) -> list[str]:
        """Module names of the encoder's feature levels, shallow to deep."""
        return [f"encoder.{name}" for name in self.encoder.feature_info.module_name()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x)
        features = self.encoder(x)
        y = None
        for feature, project, fuse in zip(features[::-1], self.projections[::-1],
                                          self.fuse[::-1]):
            skip = project(feature)
            y = skip if y is None else skip + F.interpolate(
                y, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(y)
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return torch.sigmoid(self.head(y))[..., :h, :w]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def network_input(image: torch.Tensor, trimap: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` RGB in [0, 1] and ``B×1×H×W`` trimap with raw values (0/unknown/255) →
    the ``B×4×H×W`` network input: ImageNet-normalised RGB and trimap/255."""
    mean = image.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return torch.cat([(image - mean) / std, trimap.to(image.dtype) / 255.0], dim=1)
