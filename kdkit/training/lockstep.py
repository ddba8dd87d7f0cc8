"""Students in lockstep: several runs trained together on one data stream, with one
teacher forward per batch.

Rows of a comparison that share what makes their batches and their teacher (the task, the
``data:`` spec, the seed, the batch size, the device, mixed precision and memory format,
and the teacher) step on the same batch: the teacher runs once (:func:`record_teacher`, over
every feature any row's terms name; the teacher and the training data are built once for
the group, :func:`shared_parts`) and each run takes its own :func:`train_step` with that
pass, in its own random stream, with its own adapters, optimizer and schedule. Each run
keeps its own folder, checkpoint and log (a :class:`~kdkit.training.session.Session`), so
a killed group resumes row by row: the stream starts at the earliest row's step, and a row
steps only on the batches from its own step on.

A row trains alone (:func:`alone_reason`) when its model is pruned (another architecture
from a file made by the comparison) or compiled. :func:`lockstep_groups` groups the others;
on CUDA, :func:`group_size` splits a group that would not fit the device, from the memory
that one step of one row took (:func:`measured_group_size`).
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from kdkit.config import RunConfig
from kdkit.distiller import TeacherPass, record_teacher, shared_teacher_recorder
from kdkit.distributed import World, end_world, setup_world
from kdkit.errors import Interrupted
from kdkit.task import Task
from kdkit.training.batch import cudnn_benchmark
from kdkit.training.folder import RunFolder
from kdkit.training.run import (
    Run,
    TrainingData,
    build_run,
    build_teacher,
    resolve_device,
    training_data,
    uses_teacher,
)
from kdkit.training.session import Session, open_session
from kdkit.training.step import StepResult, train_step
from kdkit.training.stop import stop_signals

__all__ = ["HEADROOM", "Lockstep", "alone_reason", "group_size", "lockstep_groups",
           "lockstep_chunks", "lockstep_key", "measured_group_size", "row_key",
           "shared_parts", "train_lockstep"]

#: The fraction of the device's memory a group may plan to use.
HEADROOM = 0.85


def alone_reason(config: RunConfig) -> str | None:
    """Why ``config`` must train alone (``"a pruned model"``, ``"compiled"``), or ``None``."""
    if "pruned" in config.model:
        return "a pruned model"
    if config.train.compile:
        return "compiled"
    return None


def lockstep_key(config: RunConfig) -> str:
    """What rows must share to step on the same batches: the task, ``data:``, seed, batch
    size, device, mixed precision and memory format (the teacher is grouped separately)."""
    t = config.train
    return json.dumps({"task": config.task, "data": config.data, "seed": t.seed,
                       "batch_size": t.batch_size, "device": t.device, "amp": t.amp,
                       "amp_dtype": t.amp_dtype, "channels_last": t.channels_last},
                      sort_keys=True, default=str)


def row_key(config: RunConfig) -> tuple[str | None, str | None]:
    """``config``'s (lockstep key, or ``None`` when it trains alone; teacher, or ``None``
    when it uses none), as :func:`lockstep_groups` takes them."""
    teacher = json.dumps(config.teacher, sort_keys=True, default=str) \
        if uses_teacher(config) else None
    return (None if alone_reason(config) else lockstep_key(config)), teacher


def lockstep_groups(rows: Sequence[tuple[str | None, str | None]]) -> list[list[int]]:
    """Groups of row indices from each row's ``(lockstep key, or None: alone; teacher key,
    or None: no teacher)``: rows with one lockstep key and one teacher share a group; the
    rows of a key without a teacher join its first group with one."""
    groups: dict[tuple, list[int]] = {}
    for index, (key, teacher) in enumerate(rows):
        groups.setdefault((key, teacher) if key is not None else (None, index), []).append(index)
    for key, teacher in list(groups):
        if key is not None and teacher is None:
            host = next((k for k in groups if k[0] == key and k[1] is not None), None)
            if host is not None:
                groups[host] = sorted(groups[host] + groups.pop((key, None)))
    return list(groups.values())


def group_size(capacity: int, shared: int, per_row: int, rows: int,
               headroom: float = HEADROOM) -> int:
    """How many rows fit together: ``capacity × headroom − shared`` bytes (``shared``: the
    teacher and what every row shares) over ``per_row`` bytes each, between 1 and
    ``rows``."""
    if per_row <= 0:
        return rows
    return max(1, min(rows, math.floor((capacity * headroom - shared) / per_row)))


def measured_group_size(configs: Sequence[RunConfig], task: Task, world: World,
                        teacher: nn.Module | None, data: TrainingData) -> int:
    """Rows of ``configs`` that fit the device together: on CUDA, from the peak memory of
    one step of a throwaway run of the row with the most distillation terms (beyond what
    was allocated before it: the teacher); on the CPU, all of them."""
    device = world.device
    if device.type != "cuda":
        return len(configs)
    gc.collect()  # runs built and dropped before (a warm-up) hold no memory now
    torch.cuda.synchronize(device)
    shared = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run = build_run(max(configs, key=lambda c: len(c.distillation or [])), task, world,
                    teacher, data)
    (run.distiller or run.student).train()
    train_step(run, run.prepare(next(run.data.batches(0))))
    torch.cuda.synchronize(device)
    per_row = torch.cuda.max_memory_allocated(device) - shared
    del run
    torch.cuda.empty_cache()
    capacity = torch.cuda.get_device_properties(device).total_memory
    return group_size(capacity, shared, per_row, len(configs))


class Lockstep:
    """Runs stepping together on a batch with one teacher pass (``teacher``: the module
    they share, ``None`` when none uses one)."""

    def __init__(self, runs: Sequence[Run], teacher: nn.Module | None):
        self.runs, self.teacher = list(runs), teacher
        distillers = [run.distiller for run in runs if run.distiller is not None]
        self.recorder, self.refs = (shared_teacher_recorder(teacher, distillers)
                                    if teacher is not None else (None, []))

    def teacher_pass(self, batch) -> TeacherPass | None:
        """The teacher's pass over ``batch`` under the group's autocast (``None`` when the
        group has no teacher)."""
        if self.teacher is None:
            return None
        first = self.runs[0]
        with first.autocast():
            inputs = first.task.model_inputs(batch)
            return record_teacher(self.teacher, self.recorder, self.refs, inputs, {})

    def step(self, runs: Sequence[Run], batch) -> list[StepResult]:
        """One step of each of ``runs`` (some of the group's) on the prepared ``batch``."""
        teacher = self.teacher_pass(batch) if any(r.distilling for r in runs) else None
        return [train_step(run, batch, teacher) for run in runs]


def _loop(sessions: list[Session], teacher: nn.Module | None, progress: bool) -> None:
    """Step every session to its ``train.steps`` on one data stream, from the earliest
    session's step; a session steps on the batches from its own step on. On a stop signal,
    every session checkpoints after the step and :class:`Interrupted` is raised."""
    runs = [s.run for s in sessions]
    start, end = min(r.step for r in runs), max(r.settings.steps for r in runs)
    batches = runs[0].data.batches(start)
    group = Lockstep(runs, teacher)
    for session in sessions:
        session.begin()
    names = ", ".join(s.folder.path.parent.name for s in sessions)
    bar = tqdm(range(start, end), initial=start, total=end, desc=f"lockstep [{names}]",
               disable=not progress, mininterval=1.0)
    with cudnn_benchmark(runs[0].device, True):
        for step in bar:
            batch = runs[0].prepare(next(batches))
            due = [s for s in sessions if s.run.step == step and not s.run.finished]
            for session, result in zip(due, group.step([s.run for s in due], batch)):
                session.after_step(result)
            signal = sessions[0].stop_signal()
            if signal is not None and step + 1 < end:
                _interrupt(sessions, signal)


def _interrupt(sessions: list[Session], signal: int) -> None:
    """Checkpoint every session (see :meth:`Session.interrupt`; one that reached its steps
    in this loop has not written its final state yet) and raise one :class:`Interrupted`
    that names them."""
    stopped = [s.interrupt(signal) for s in sessions]
    raise Interrupted("; ".join(str(error) for error in stopped), signal)


def lockstep_chunks(configs: Sequence[RunConfig], task: Task,
                    world: World) -> list[list[RunConfig]]:
    """``configs`` (rows of one seed) as the units to train: each lockstep group
    (:func:`lockstep_groups`), split into chunks that fit the device
    (:func:`measured_group_size`, measured with the group's teacher); a row that trains
    alone is a chunk of one."""
    chunks = []
    for group in lockstep_groups([row_key(c) for c in configs]):
        members = [configs[i] for i in group]
        size = len(members)
        if len(members) > 1 and world.device.type == "cuda":
            size = measured_group_size(members, task, world,
                                       *shared_parts(members, task, world))
        chunks += [members[i:i + size] for i in range(0, len(members), size)]
    return chunks


def shared_parts(configs: Sequence[RunConfig], task: Task,
                 world: World) -> tuple[nn.Module | None, TrainingData]:
    """(the teacher, ``None`` when none uses one; the training data) that ``configs`` (one
    group) share, each built once."""
    user = next((c for c in configs if uses_teacher(c)), None)
    teacher = None if user is None else build_teacher(user, task, world.device)
    return teacher, training_data(configs[0], task, world)


def train_lockstep(configs: Sequence[RunConfig], task: Task, resume: bool = True,
                   progress: bool = True) -> list[dict[str, float]]:
    """Train ``configs`` (one chunk of :func:`lockstep_chunks`) together, each into its own
    folder (resumed where its checkpoint allows, like :func:`kdkit.train.train`); returns
    each run's final metrics, in order."""
    world = setup_world(resolve_device(configs[0].train.device))
    try:
        with ExitStack() as stack:
            stack.enter_context(stop_signals())
            teacher, data = shared_parts(configs, task, world)
            sessions = []
            for config in configs:
                folder = RunFolder(Path(config.out_dir), world.is_main)
                stack.enter_context(folder.claimed())
                sessions.append(stack.enter_context(open_session(
                    config, task, folder, resume, progress and world.is_main, world, teacher,
                    data)))
            metrics = [s.final_metrics_logged() for s in sessions]
            todo = [s for s, m in zip(sessions, metrics) if m is None]
            if todo:
                _loop(todo, teacher, progress and world.is_main)
            return [m if m is not None else s.finish() for s, m in zip(sessions, metrics)]
    finally:
        end_world(world)
