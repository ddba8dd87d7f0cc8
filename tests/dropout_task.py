"""The toy task with dropout in its model, so that training draws from torch's global
generator: a resumed run matches an uninterrupted one only if that generator's state (each
process's own) is restored. Config: ``task: dropout_task:DropoutTask``."""

from __future__ import annotations

from typing import Any

from torch import nn
from toy_task import ToyNet, ToyTask


class DropoutNet(ToyNet):
    def __init__(self, width: int = 8, p: float = 0.5):
        super().__init__(width)
        self.dropout = nn.Dropout(p)

    def forward(self, x):
        return self.head(self.dropout(self.body(x)))


class DropoutTask(ToyTask):
    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        return DropoutNet(**spec)
