"""Metrics of a model over a dataset (with several processes, each evaluates its share)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from kdkit.config import RunConfig
from kdkit.data import resolve_num_workers
from kdkit.distributed import World
from kdkit.task import Task
from kdkit.training.batch import cudnn_benchmark, to_device

__all__ = ["evaluate", "metric_values", "test_batches"]


def test_batches(dataset: Dataset, device: torch.device, num_workers: int | str = 0,
                 progress: bool = False, world: World | None = None) -> Iterator[Any]:
    """A dataset's samples one per batch (evaluation images may differ in size), on
    ``device``; with several processes, this process's share (every ``size``-th sample)."""
    if world is not None and world.distributed:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.size))
    # its own generator: evaluating draws nothing from torch's global one, so training after
    # an evaluation continues the stream a checkpoint before it saved
    loader = DataLoader(dataset, batch_size=1, num_workers=resolve_num_workers(num_workers),
                        generator=torch.Generator())
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        yield to_device(batch, device)


def metric_values(metrics) -> dict[str, float]:
    """A computed ``torchmetrics`` metric or collection as ``{name: float}``."""
    values = metrics.compute()
    values = values if isinstance(values, dict) else {"metric": values}
    return {name: float(value) for name, value in values.items()}


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, dataset: Dataset, run: RunConfig,
             device: torch.device, progress: bool = True,
             world: World | None = None) -> dict[str, float]:
    """Metrics of ``model`` over ``dataset``, as plain floats (with several processes,
    each evaluates its share and torchmetrics combines them)."""
    was_training = model.training
    model.eval()
    metrics = task.metrics(run.metrics).to(device)
    with cudnn_benchmark(device, False):  # evaluation images differ in size
        for batch in test_batches(dataset, device, run.train.num_workers, progress, world):
            task.update_metrics(metrics, model(*task.model_inputs(batch)), batch)
    model.train(was_training)
    return metric_values(metrics)
