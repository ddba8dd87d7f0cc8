"""Graceful stop: the signals a scheduler sends before it preempts or times out a job
(SIGTERM; SLURM's ``--signal`` sends SIGUSR1 by default) and Ctrl-C (SIGINT) finish the
step in flight instead of killing the process.

While :func:`stop_signals` is active, those signals only record a request
(:data:`REQUEST`); the training loops read it after each step (:func:`stop_requested`),
save a checkpoint and raise :class:`~kdkit.errors.Interrupted`. A second signal while the
checkpoint is written is recorded too and changes nothing (the save runs to its end, and
it is atomic anyway). Under DDP a signal may reach one process only: the request is
all-reduced so every process stops at the same step. Handlers can be set from the main
thread only; elsewhere (a notebook's worker thread) the signals keep their own handlers.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kdkit.distributed import World

__all__ = ["REQUEST", "STOP_SIGNALS", "StopRequest", "signal_name", "stop_requested",
           "stop_signals"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@dataclass
class StopRequest:
    """The first stop signal received (``signal``, ``None`` until one comes) and how many
    :func:`stop_signals` blocks are open (handlers are set by the outermost)."""

    signal: int | None = None
    depth: int = 0
    previous: dict = field(default_factory=dict)

    def record(self, signum: int, frame) -> None:
        if self.signal is None:
            self.signal = signum


REQUEST = StopRequest()


@contextmanager
def stop_signals() -> Iterator[StopRequest]:
    """Within the block, :data:`STOP_SIGNALS` set :data:`REQUEST` instead of stopping the
    process; the outermost block sets the handlers and puts the previous ones back (a
    request left unread is dropped with them)."""
    main = threading.current_thread() is threading.main_thread()
    if main and REQUEST.depth == 0:
        REQUEST.previous = {s: signal.signal(s, REQUEST.record) for s in STOP_SIGNALS}
    REQUEST.depth += 1
    try:
        yield REQUEST
    finally:
        REQUEST.depth -= 1
        if main and REQUEST.depth == 0:
            for number, handler in REQUEST.previous.items():
                signal.signal(number, handler)
            REQUEST.previous, REQUEST.signal = {}, None


def stop_requested(world: World) -> int | None:
    """The signal that asked to stop, on any process (a collective under DDP: every process
    calls it at the same step), else ``None``."""
    if not world.distributed:
        return REQUEST.signal
    flag = torch.tensor([REQUEST.signal or 0], dtype=torch.int64,
                        device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item()) or None


def signal_name(number: int) -> str:
    """``15`` → ``"SIGTERM"``."""
    return signal.Signals(number).name
