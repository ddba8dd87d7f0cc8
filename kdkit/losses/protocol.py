"""What the Distiller asks of a loss module.

A loss is any ``nn.Module`` called as ``loss(student, teacher) → scalar tensor``, student
features first, teacher features second (the teacher's never part of the graph). Two
optional members change how the Distiller calls it; :class:`DistillationLoss` documents
them and gives their defaults, and :func:`takes_lists` / :func:`bind_teacher` are how the
Distiller reads them, so that a plain ``nn.Module`` (``nn.MSELoss()``) counts as a loss
with the defaults.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

__all__ = ["DistillationLoss", "takes_lists", "bind_teacher"]


class DistillationLoss(nn.Module):
    """Base of kdkit's losses and of a user's own.

    Attributes:
        takes_lists: ``False`` (default): the Distiller calls ``loss(s, t)`` with the one
            student and the one teacher feature of the term (``B×C×…`` each, after the
            adapter). ``True``: it calls ``loss([s1, …], [t1, …])`` with every feature the
            term lists, in order (FSP uses consecutive pairs).
    """

    takes_lists: ClassVar[bool] = False

    def bind_teacher(self, modules: list[nn.Module]) -> None:
        """Called once, when the Distiller is built, with the teacher modules the term
        names, one per teacher reference (the teacher itself for ``"output"``), so that a
        loss can read the teacher's parameters (OFD takes its margin from the teacher's
        BatchNorm). The default reads nothing."""

    def forward(self, student, teacher) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define forward(student, teacher)")


def takes_lists(loss: nn.Module) -> bool:
    """Whether ``loss`` receives lists of features (:attr:`DistillationLoss.takes_lists`)."""
    return bool(getattr(loss, "takes_lists", DistillationLoss.takes_lists))


def bind_teacher(loss: nn.Module, modules: list[nn.Module]) -> None:
    """Give ``loss`` the teacher modules of its term, when it asks for them
    (:meth:`DistillationLoss.bind_teacher`)."""
    bind = getattr(loss, "bind_teacher", None)
    if bind is not None:
        bind(modules)
