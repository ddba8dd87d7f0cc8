"""Masked generative distillation (MGD, Yang et al. 2022): drop random pixels of the
(adapted) student feature and train a small generator to rebuild the teacher's feature
from what is left."""

from __future__ import annotations

import torch
from torch import nn

from kdkit.errors import ConfigError
from kdkit.losses._shapes import require_match, require_min_dims
from kdkit.losses.protocol import DistillationLoss
from kdkit.losses.registry import register_loss

__all__ = ["mgd_generator", "mgd_mask", "mgd_loss", "MGDLoss"]


def mgd_generator(channels: int) -> nn.Sequential:
    """The generator: 3×3 conv, ReLU, 3×3 conv, ``channels`` → ``channels``, with bias."""
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


def mgd_mask(feature: torch.Tensor, ratio: float) -> torch.Tensor:
    """``B×C×H×W`` → ``B×1×H×W`` of 0/1 in ``feature``'s dtype: ``u ~ U[0,1)`` drawn from
    torch's global generator of ``feature``'s device, 0 where ``u > 1 − ratio`` (each
    pixel dropped, across all channels, with probability ``ratio``)."""
    u = torch.rand((feature.shape[0], 1, *feature.shape[2:]), device=feature.device)
    return (u <= 1 - ratio).to(feature.dtype)


def mgd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    generation: nn.Module,
    mask: torch.Tensor,
    alpha: float = 2e-5,
) -> torch.Tensor:
    """``B×C×H×W`` twice (the student at the teacher's channels), a ``B×1×H×W`` mask →
    scalar: ``α · Σ_{b,c,h,w} (generation(Fs·M) − Ft)² / B``."""
    name = "mgd_loss"
    require_min_dims(name, student, "student", 4, "B×C×H×W")
    require_match(
        name, "shape", student, teacher, slice(None),
        "Map the student to the teacher's channels with an adapter (e.g. 'conv1x1'), at a "
        "layer of the same spatial size.",
    )
    expected = (student.shape[0], 1, *student.shape[2:])
    if tuple(mask.shape) != expected:
        raise ConfigError(
            f"{name}: the mask must be B×1×H×W = {'×'.join(map(str, expected))}; found "
            f"{'×'.join(map(str, mask.shape))}")
    generated = generation(student * mask)
    return alpha * (generated - teacher.detach()).pow(2).sum() / student.shape[0]


@register_loss("mgd")
class MGDLoss(DistillationLoss):
    """Module form of :func:`mgd_loss`, owning the generator (``generation``, trained
    with the student) and drawing a fresh mask (:func:`mgd_mask`) on every call.

    ``channels``: the teacher feature's channels; left out, the generator is sized by the
    first call without gradients (the Distiller's sizing pass on ``example_inputs``)."""

    def __init__(self, alpha: float = 2e-5, ratio: float = 0.75, channels: int | None = None):
        super().__init__()
        if not 0 <= ratio <= 1:
            raise ConfigError(f"mgd: the mask ratio must lie in [0, 1], got {ratio}")
        self.alpha, self.ratio = alpha, ratio
        self.generation = None if channels is None else mgd_generator(channels)

    def _generator_for(self, teacher: torch.Tensor) -> nn.Module:
        channels = teacher.shape[1] if teacher.dim() > 1 else 0
        if self.generation is None:
            if torch.is_grad_enabled():
                raise ConfigError(
                    "mgd: the generator is sized from the teacher feature before training "
                    "(so that the optimizer gets its parameters): build the Distiller with "
                    "example_inputs, or pass channels=<teacher channels>")
            self.generation = mgd_generator(channels).to(teacher.device, teacher.dtype)
        if self.generation[0].in_channels != channels:
            raise ConfigError(
                f"mgd: the generator was built for {self.generation[0].in_channels} "
                f"channels, the teacher feature has {channels}")
        return self.generation

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        generation = self._generator_for(teacher)
        return mgd_loss(student, teacher, generation, mgd_mask(student, self.ratio), self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, ratio={self.ratio}"
