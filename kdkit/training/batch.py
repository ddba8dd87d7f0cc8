"""Moving a (nested) batch of tensors to a device and memory format."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = ["channels_last", "cudnn_benchmark", "prepare_batch", "to_device"]


def _map_tensors(batch: Any, function: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``function`` applied to every tensor of a nested dict / list / tuple batch."""
    if isinstance(batch, torch.Tensor):
        return function(batch)
    if isinstance(batch, dict):
        return {k: _map_tensors(v, function) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_map_tensors(v, function) for v in batch)
    return batch


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    return _map_tensors(batch, lambda t: t.to(device, non_blocking=True))


def channels_last(batch: Any) -> Any:
    """4-D floating-point tensors of a (nested) batch in channels-last memory format."""
    return _map_tensors(batch, lambda t: t.contiguous(memory_format=torch.channels_last)
                        if t.dim() == 4 and t.is_floating_point() else t)


def prepare_batch(batch: Any, device: torch.device, in_channels_last: bool) -> Any:
    """A loader's batch on ``device``, in channels-last format when the run asks for it."""
    batch = to_device(batch, device)
    return channels_last(batch) if in_channels_last else batch


@contextmanager
def cudnn_benchmark(device: torch.device, enabled: bool) -> Iterator[None]:
    """cuDNN's kernel autotuning on ``device`` (CUDA only) switched to ``enabled`` inside the
    block: on for training steps, whose batches have one shape (the task's training crop),
    so each convolution is tuned once; off for evaluation, whose images differ in size
    (every new shape would be tuned again)."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
