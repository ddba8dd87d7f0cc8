"""What a checkpoint holds, both ways: :func:`checkpoint_state` collects it from a run,
:func:`restore_state` puts it back; each part has its own pair of functions.

A checkpoint holds the step, the student's weights, the distiller's adapters and loss
modules, the optimizer, the schedule, the loss scaler, and every process's random stream
of the run (:mod:`kdkit.training.randomness`: torch's CPU generator and, on CUDA, the
device's), as lists in rank order: each process resumes its own stream.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from kdkit.checkpoint import load_state, save_atomic
from kdkit.distiller import Distiller
from kdkit.distributed import World, all_gather_values
from kdkit.errors import CheckpointError
from kdkit.training.randomness import RandomStream
from kdkit.training.run import Run

__all__ = ["checkpoint_state", "distiller_state", "random_state", "restore_distiller",
           "restore_random_state", "restore_state", "save_checkpoint", "save_weights"]


def random_state(stream: RandomStream, world: World) -> dict[str, list[torch.Tensor]]:
    """Every process's run stream states in rank order: ``rng`` (CPU) and, on CUDA,
    ``cuda_rng``. A collective: every process calls it."""
    state = {"rng": stream.cpu}
    if stream.cuda is not None:
        state["cuda_rng"] = stream.cuda
    gathered = all_gather_values(state, world)
    return {name: [s[name].cpu() for s in gathered] for name in state}


def restore_random_state(stream: RandomStream, state: dict[str, Any], world: World,
                         source: Path) -> None:
    """Set this process's run ``stream`` to its own entry of :func:`random_state`'s
    lists."""
    states = _per_process(state["rng"])
    if len(states) != world.size:
        raise CheckpointError(
            f"{source} was written by {len(states)} process(es) and this run has "
            f"{world.size}: each process resumes its own random stream, so resume with "
            f"{len(states)} process(es), or start over with --no-resume")
    stream.cpu = states[world.rank].cpu()
    if world.device.type == "cuda" and "cuda_rng" in state:
        stream.cuda = _per_process(state["cuda_rng"])[world.rank].cpu()


def _per_process(states: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    """A list of states in rank order (checkpoints of kdkit 0.1 held one process's state)."""
    return [states] if isinstance(states, torch.Tensor) else states


def distiller_state(distiller: Distiller) -> dict[str, dict]:
    """The distiller's own trainable parts: its adapters and its loss modules."""
    return {"adapters": distiller.adapters.state_dict(),
            "losses": distiller.losses.state_dict()}


def restore_distiller(distiller: Distiller, state: dict[str, Any], source: Path) -> None:
    if "distiller" not in state:
        raise CheckpointError(
            f"{source} holds no distillation adapters (another run's checkpoint); start over "
            "with --no-resume")
    load_state(distiller.adapters, state["distiller"]["adapters"], f"{source} (adapters)")
    load_state(distiller.losses, state["distiller"]["losses"], f"{source} (loss modules)")


def checkpoint_state(run: Run) -> dict[str, Any]:
    """What a checkpoint of ``run`` holds (see the module docstring). A collective: every
    process calls it (the random states are gathered)."""
    state = {"step": run.step, "model": run.model.state_dict(),
             "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(),
             "scaler": run.scaler.state_dict(), **random_state(run.random, run.world)}
    if run.distiller is not None:
        state["distiller"] = distiller_state(run.distiller)
    return state


def restore_state(run: Run, state: dict[str, Any], source: Path) -> None:
    """Put a :func:`checkpoint_state` (read from ``source``) back into a freshly built
    ``run``; a part that does not fit is a short :class:`CheckpointError`."""
    load_state(run.model, state["model"], source)
    if run.distiller is not None:
        restore_distiller(run.distiller, state, source)
    run.optimizer.load_state_dict(state["optimizer"])
    run.schedule.load_state_dict(state["schedule"])
    run.scaler.load_state_dict(state["scaler"])
    restore_random_state(run.random, state, run.world, source)
    run.step = run.last_checkpoint = int(state["step"])


def save_checkpoint(run: Run, path: Path) -> None:
    """Write ``run``'s checkpoint to ``path`` atomically (rank 0 writes; every process
    calls it)."""
    state = checkpoint_state(run)
    if run.world.is_main:
        save_atomic(state, path)
    run.last_checkpoint = run.step


def save_weights(run: Run, path: Path) -> None:
    """Write ``run``'s model weights alone (``model.pt``) atomically (rank 0 writes)."""
    if run.world.is_main:
        save_atomic({"model": run.model.state_dict()}, path)
