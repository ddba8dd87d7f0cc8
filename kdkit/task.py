"""The contract between the core and a task package, and how a config names its task.

kdkit never imports a task: a config's ``task:`` is either a short name registered under
the ``kdkit.tasks`` entry-point group (``matting``) or a dotted path ``module:Class``.
"""

from __future__ import annotations

import difflib
import importlib
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from kdkit.errors import ConfigError

__all__ = ["Task", "load_task", "registered_tasks"]

ENTRY_POINT_GROUP = "kdkit.tasks"


class Task(Protocol):
    """What a task package provides to the training loop, evaluation and prediction.

    A batch is whatever the task's datasets yield after default collation (usually a dict
    of tensors). Conventions the core relies on:

    - :meth:`losses` names each term as its weight in the config's ``loss:`` (``alpha``
      weighted by ``loss.alpha``); the log's ``task_loss`` divides each weight back out,
      so it compares across methods;
    - a task loss weight named ``teacher_*`` is a term against the teacher's prediction:
      runs that set one are given the teacher (``task_loss`` leaves it out); after a run's
      ``distill_until``, ``teacher_X``'s weight is moved onto ``X`` in ``spec`` and
      ``teacher_prediction`` is ``None``;
    - ``primary_metric`` is ``(metric name, "lower" | "higher")``: the comparison report
      ranks and tests methods on it (a compare config's ``report.primary`` overrides it);
    - optional ``metric_units`` (``{metric name: unit}``, e.g. ``{"SAD": "sum ÷ 1000"}``):
      the report's headers state them; optional ``metrics_version`` (an int, 1 when
      absent): bump it when the metrics change, so cached per-image metrics are recomputed;
    - :meth:`datasets` sees only ``data:``, so what a batch carries is said there: fields
      that only some loss terms use are left out through ``data:`` (matting's
      ``data.fields``: fg and bg only for the composition loss), and :meth:`losses` raises a
      :class:`~kdkit.errors.ConfigError` naming that key when a term finds its field missing;
    - a training set with a ``prepare()`` method (a :class:`~kdkit.data.SeededDataset` with
      ``pool``) is prepared by :class:`~kdkit.sampling.KeyedSamples` in the process that
      builds the loader, before its workers start, so they share what it made.
    """

    primary_metric: tuple[str, str]

    def build_model(self, spec: dict[str, Any]) -> nn.Module:
        """A model from the config's ``model:`` mapping."""

    def datasets(self, spec: dict[str, Any]) -> tuple[Dataset, Dataset]:
        """(train, evaluation) datasets from the config's ``data:`` mapping."""

    def model_inputs(self, batch: Any) -> tuple:
        """Positional arguments for the model (and the teacher) from a batch."""

    def losses(self, prediction: Any, batch: Any, teacher_prediction: Any | None,
               spec: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Named, weighted task losses (the distillation terms come from the Distiller);
        ``spec`` is the config's ``loss:`` mapping."""

    def metrics(self, spec: dict[str, Any]) -> Any:
        """A fresh ``torchmetrics`` metric or collection; updated with
        ``update(prediction, batch)`` through :meth:`update_metrics`."""

    def update_metrics(self, metrics: Any, prediction: Any, batch: Any) -> None:
        """Add one batch's predictions to ``metrics``."""

    def flops_inputs(self, height: int, width: int) -> tuple:
        """Model inputs of one sample at ``height × width`` (for counting FLOPs)."""

    def example_panels(self, batch: Any, predictions: dict[str, Any]) -> list:
        """For the report's example figure: ``(title, H×W or H×W×3 array in [0, 1])``
        panels for the first sample of ``batch`` (inputs, truth, then each prediction)."""

    def predict(self, model: nn.Module, inputs: str, guides: str | None, output: str,
                data: dict[str, Any], device: torch.device,
                long_side: int | None = None) -> list:
        """Optional (``kdkit predict``): run ``model`` on image files or folders (with a
        per-image guide such as a trimap, for tasks that take one), write results into
        ``output`` at the inputs' resolution, return the written paths. ``long_side``
        (``--long-side``): the network sees each input resized so that its longer side has
        that many pixels (:mod:`kdkit.rescale`)."""

    def write_synthetic(self, out: str, n: int, size: int, seed: int,
                        backgrounds: str | None = None) -> Any:
        """Optional (``kdkit data synth``): write ``n`` generated samples as a folder;
        ``backgrounds`` (``--backgrounds``, ``None`` for the task's default) where the task
        has such a choice."""

    def training_free(self) -> dict[str, Any]:
        """Optional (a compare config's ``{training_free: <name>}`` rows): the task's
        classical methods that need no training, by name; each is a callable mapping one
        test sample as :func:`kdkit.train.test_batches` yields it (a batch of one, on the
        evaluation device) to a prediction in the form :meth:`update_metrics` takes. An
        optional ``version`` attribute (a string) enters their cached metrics' key. None
        when absent."""


def registered_tasks() -> dict[str, str]:
    """Short task names → ``module:Class`` from installed entry points."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_task(name: str) -> Task:
    """Instantiate the task ``name`` (a registered short name or ``module:Class``); an
    unknown or unloadable one is a :class:`~kdkit.errors.ConfigError`."""
    target = registered_tasks().get(name, name)
    if ":" not in target:
        known = registered_tasks()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"unknown task {name!r}.{hint} Registered tasks: {', '.join(known) or 'none'}; "
            "or give a dotted path such as 'my_package.task:MyTask'"
        )
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attribute)()
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"could not load task {name!r} from {target!r}: {error}") from None
