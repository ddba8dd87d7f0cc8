"""Multi-process training through ``torchrun``: process-group set-up from the environment,
data sharding, gradient averaging for parameters outside the DDP-wrapped student, a
differentiable all-gather for losses that need the global batch, and an all-gather of
small values (each process's random state, for its checkpoint).

``torchrun --nproc_per_node=K -m kdkit train CONFIG`` starts K processes; each reads
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` from the environment. The backend is NCCL on
CUDA and gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["World", "all_gather_values", "all_gather_with_grad", "average_gradients",
           "end_world", "setup_world"]


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # set_up_world created the process group (and ends it)

    @property
    def is_main(self) -> bool:
        """Whether this process writes checkpoints, logs and progress (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def setup_world(device: torch.device) -> World:
    """Join the process group that ``torchrun`` describes in the environment (once), or a
    world of one when there is none. On CUDA each process takes the GPU ``LOCAL_RANK``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 1, device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), device, owns)


def end_world(world: World) -> None:
    """Leave the process group if :func:`setup_world` created it."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def average_gradients(parameters: list[nn.Parameter], world: World) -> None:
    """Average the gradients of ``parameters`` over the processes with one flattened
    all-reduce (for the few parameters that DDP does not own: adapters, loss modules)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not world.distributed or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_gather_values(value: Any, world: World) -> list[Any]:
    """``value`` of every process, in rank order (every process gets the list); a list of
    one without a process group. For small picklable values such as random states."""
    if not world.distributed:
        return [value]
    values: list[Any] = [None] * world.size
    dist.all_gather_object(values, value)
    return values


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose backward makes the incoming gradient contiguous: under gloo,
    torch's all-gather backward (an all-to-all into ``empty_like`` buffers) returns a
    strided gradient, such as that of a transposed view of the gathered batch, scrambled
    (torch 2.14; tests/test_pairwise_affinity.py)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` of every process concatenated along dim 0 (rank order); gradients flow
    back to each process's own part. The identity without a process group."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    from torch.distributed.nn.functional import all_gather

    return _ContiguousGrad.apply(torch.cat(all_gather(tensor.contiguous()), dim=0))
