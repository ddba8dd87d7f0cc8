"""Each run's own random stream, so runs that step in turn (students in lockstep) draw
what each would draw alone.

Modules draw from torch's global generators (``nn.Dropout`` takes no generator), so a run
keeps its own generator states (torch's CPU generator and, on CUDA, the device's) and
:meth:`RandomStream.active` swaps them in for the run's steps: inside, the global
generators are the run's; on leaving, the run's advanced states are kept and the outer ones
put back. Setting and reading a generator's state is a host-side copy of a few bytes (the
CUDA generator's state is its seed and offset): no device synchronisation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RandomStream"]


def _states(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """torch's global (CPU, ``device``'s CUDA or ``None``) generator states."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_states(device: torch.device, cpu: torch.Tensor, cuda: torch.Tensor | None) -> None:
    torch.set_rng_state(cpu)
    if device.type == "cuda" and cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


@dataclass
class RandomStream:
    """A run's generator states: ``cpu`` and, on CUDA, ``cuda`` (CPU byte tensors)."""

    device: torch.device
    cpu: torch.Tensor
    cuda: torch.Tensor | None = None

    @classmethod
    def seeded(cls, seed: int, rank: int, device: torch.device) -> RandomStream:
        """The stream of process ``rank`` of a run seeded ``seed`` (processes draw
        different streams); torch's global generators are left as they were."""
        outer = _states(device)
        torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
        stream = cls(device, *_states(device))
        _set_states(device, *outer)
        return stream

    @contextmanager
    def active(self) -> Iterator[None]:
        """torch's global generators are this stream's inside the block."""
        outer = _states(self.device)
        _set_states(self.device, self.cpu, self.cuda)
        try:
            yield
        finally:
            self.cpu, self.cuda = _states(self.device)
            _set_states(self.device, *outer)
