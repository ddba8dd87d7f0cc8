"""A tiny task for testing the training loop itself: a two-conv network without
BatchNorm regressing the mean colour of random images (deterministic by index), with
optional poisoned samples whose image is NaN. Config: ``task: toy_task:ToyTask``."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from torchmetrics import MeanSquaredError


class ToyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, x):
        return self.head(self.body(x))


class ToyData(Dataset):
    def __init__(self, length: int, size: int, offset: int, poison: list[int]):
        self.length, self.size, self.offset, self.poison = length, size, offset, set(poison)

    def __len__(self):
        return self.length

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(self.offset + index)
        image = torch.rand(3, self.size, self.size, generator=generator)
        target = image.mean(0, keepdim=True)
        if index in self.poison:
            image = torch.full_like(image, float("nan"))
        return {"image": image, "target": target}


class ToyTask:
    primary_metric = ("mse", "lower")
    seen: list[tuple[torch.dtype, bool]] = []  # (prediction dtype, input channels-last)

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return ToyNet(**spec)

    def datasets(self, spec: dict[str, Any]):
        spec = {"length": 16, "size": 8, "poison": [], **spec}
        return (ToyData(spec["length"], spec["size"], 0, spec["poison"]),
                ToyData(4, spec["size"], 1000, []))

    def model_inputs(self, batch):
        return (batch["image"],)

    def losses(self, prediction, batch, teacher_prediction, spec):
        ToyTask.seen.append((prediction.dtype, batch["image"].is_contiguous(
            memory_format=torch.channels_last)))
        return {"mse": spec.get("mse", 1.0) * F.mse_loss(prediction.float(), batch["target"])}

    def metrics(self, spec):
        return MeanSquaredError()

    def update_metrics(self, metrics, prediction, batch):
        metrics.update(prediction.float(), batch["target"])

    def flops_inputs(self, height, width):
        return (torch.zeros(1, 3, height, width),)

    def example_panels(self, batch, predictions):
        return [("target", batch["target"][0, 0].numpy())]


class MeanColour:
    """A training-free toy method: a batch of one image → its channel mean (the toy
    target, exactly); counts its calls."""

    version = "1"
    calls = 0

    def __call__(self, batch):
        MeanColour.calls += 1
        return batch["image"].mean(1, keepdim=True)


class TrainingFreeToyTask(ToyTask):
    """The toy task with one training-free method, ``mean_colour``."""

    def training_free(self):
        return {"mean_colour": MeanColour()}
