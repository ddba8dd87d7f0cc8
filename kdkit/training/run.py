"""Building a run: everything one student's training holds, made from its config.

:func:`build_run` turns a :class:`~kdkit.config.RunConfig` into a :class:`Run`: the model
(and its DDP / compiled wrapper), the frozen teacher, the distiller, the training data, the
optimizer over the student's and the distiller's parameters, the schedule and the loss
scaler. A built run starts at step 0; :func:`kdkit.training.state.restore_state` moves it to
a checkpoint's step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, default_collate

from kdkit.checkpoint import load_weights, resolve_path
from kdkit.config import (
    ConfigError,
    RunConfig,
    TrainSettings,
    distill_steps,
    ground_truth_weights,
)
from kdkit.data import resolve_num_workers
from kdkit.distiller import Distiller
from kdkit.distributed import World
from kdkit.pruning import load_pruned, prepare_for_sparsity
from kdkit.sampling import KeyedSamples, ResumableSampler, endless_batches
from kdkit.task import Task
from kdkit.training.batch import prepare_batch
from kdkit.training.randomness import RandomStream

__all__ = ["AMP_DTYPES", "Run", "TrainingData", "build_model", "build_run", "build_teacher",
           "resolve_device", "skips_on_device", "training_data", "uses_teacher"]

AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is visible; use 'auto'")
    return device


def build_model(task: Task, spec: dict[str, Any]) -> nn.Module:
    """The task's model for ``spec``; with ``pruned: PATH`` the unpruned model resized to
    that pruned model's channels and loaded with its weights, re-initialised when
    ``reinit: true`` (the DCP paper's retraining) or inherited otherwise."""
    spec = dict(spec)
    pruned, reinit = spec.pop("pruned", None), spec.pop("reinit", False)
    if pruned is None:
        return task.build_model(spec)
    model = load_pruned(lambda: task.build_model(spec), resolve_path(pruned))
    if reinit:
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


@dataclass
class TrainingData:
    """The training set behind a resumable, sharded loader, and the evaluation set."""

    train_set: Dataset
    eval_set: Dataset
    sampler: ResumableSampler
    loader: DataLoader

    def batches(self, step: int) -> Iterator[Any]:
        """Training batches without end, from the batch of (0-based) ``step`` on."""
        return endless_batches(self.loader, self.sampler, self.loader.batch_size, step)


def training_data(run: RunConfig, task: Task, world: World) -> TrainingData:
    """The run's training set, its resumable loader, and the evaluation set."""
    settings = run.train
    train_set, eval_set = task.datasets(run.data)
    sampler = ResumableSampler(len(train_set), settings.seed, world.rank, world.size)
    # The loader draws its workers' base seed from its own generator, not from torch's
    # global one, so a resumed run's dropout (or any global draw) continues unshifted.
    loader = DataLoader(KeyedSamples(train_set, settings.seed),
                        batch_size=settings.batch_size, sampler=sampler,
                        num_workers=resolve_num_workers(settings.num_workers), drop_last=True,
                        pin_memory=world.device.type == "cuda",
                        generator=torch.Generator().manual_seed(settings.seed))
    return TrainingData(train_set, eval_set, sampler, loader)


@dataclass(eq=False)
class Run:
    """One student's training: what a step changes and what a checkpoint holds.

    ``model`` is the bare student (what checkpoints and ``model.pt`` hold); ``student`` is
    what the forward calls (``model``, wrapped in DDP and/or compiled). ``parameters`` are
    what the optimizer updates; ``extras`` those among them outside DDP (distillation
    adapters and loss modules), whose gradients are averaged by hand. ``random`` is the
    run's own random stream (:mod:`kdkit.training.randomness`). ``step`` counts the steps
    taken; ``last_checkpoint`` is the step of the newest checkpoint, ``None`` before the
    first. ``unchecked`` holds the steps whose finiteness was not read yet
    (:func:`kdkit.training.step.check_finite`)."""

    config: RunConfig
    task: Task
    world: World
    data: TrainingData
    model: nn.Module
    student: nn.Module
    teacher: nn.Module | None
    distiller: Distiller | None
    parameters: list[nn.Parameter]
    extras: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    random: RandomStream
    step: int = 0
    last_checkpoint: int | None = None
    skipped_in_a_row: int = 0
    unchecked: list = field(default_factory=list)

    @property
    def settings(self) -> TrainSettings:
        return self.config.train

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped on the device (CUDA: the fused optimizer
        reads a device flag, no host synchronisation) rather than by the host reading the
        loss each step (the CPU, where reading a value waits for nothing)."""
        return skips_on_device(self.device)

    @property
    def distilling(self) -> bool:
        """Whether the next step uses the teacher: the run has one and has taken fewer than
        :func:`~kdkit.config.distill_steps` steps."""
        return self.teacher is not None and self.step < distill_steps(self.config)

    @property
    def loss_weights(self) -> dict[str, Any]:
        """The next step's task loss weights: ``loss:`` while distilling, then
        :func:`~kdkit.config.ground_truth_weights` of it."""
        loss = self.config.loss
        return loss if self.distilling or self.teacher is None else ground_truth_weights(loss)

    @property
    def finished(self) -> bool:
        """Whether the run has taken its ``train.steps``."""
        return self.step >= self.settings.steps

    def prepare(self, batch: Any) -> Any:
        """A loader's batch on this run's device and memory format."""
        return prepare_batch(batch, self.device, self.settings.channels_last)

    def autocast(self) -> AbstractContextManager:
        """Mixed precision as configured (:func:`amp_enabled`)."""
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.settings.amp_dtype],
                              enabled=amp_enabled(self.settings, self.device))


def amp_enabled(settings: TrainSettings, device: torch.device) -> bool:
    """Whether to autocast: ``train.amp`` on CUDA, and on the CPU with bf16 only."""
    return settings.amp and (device.type == "cuda" or settings.amp_dtype == "bf16")


def skips_on_device(device: torch.device) -> bool:
    """See :attr:`Run.skips_on_device`."""
    return device.type == "cuda"


def _optimizer(parameters: list[nn.Parameter], settings: TrainSettings,
               device: torch.device) -> torch.optim.Optimizer:
    """``train.optimizer`` (a choice that :mod:`kdkit.config` checks) over ``parameters``,
    in the fused implementation where ``device`` has one (CUDA and the CPU: one kernel per
    step instead of one per parameter and operation, 5% of a tiny student's CPU step; on
    CUDA it also skips its step on the device when its ``found_inf`` flag is set)."""
    fused = device.type in ("cpu", "cuda") or None
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9,
                               weight_decay=settings.weight_decay, fused=fused)
    return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay,
                            fused=fused)


def _schedule(optimizer: torch.optim.Optimizer, settings: TrainSettings):
    """Cosine decay from ``lr`` to 0 over ``steps``, or constant (``train.schedule``). The
    cosine curve depends on ``steps``: changing it changes the learning rate of every step."""
    steps = settings.steps
    if settings.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def build_teacher(run: RunConfig, task: Task, device: torch.device) -> nn.Module:
    """The frozen teacher, in eval mode, in the run's memory format."""
    if not run.teacher or "model" not in run.teacher or "checkpoint" not in run.teacher:
        raise ConfigError(
            "a run with a teacher or distillation terms needs 'teacher: {model: {...}, "
            "checkpoint: PATH}' (train the teacher first with its own config)"
        )
    teacher = load_weights(build_model(task, run.teacher["model"]), run.teacher["checkpoint"])
    teacher = teacher.to(device, memory_format=_memory_format(run.train))
    return teacher.eval().requires_grad_(False)


def _memory_format(settings: TrainSettings) -> torch.memory_format:
    return torch.channels_last if settings.channels_last else torch.contiguous_format


def _student_model(run: RunConfig, task: Task, device: torch.device) -> nn.Module:
    """The student as built from ``run.model`` (seeded by ``train.seed``), prepared for
    sparsity training when the run asks for it."""
    torch.manual_seed(run.train.seed)
    model = build_model(task, run.model).to(device)
    if run.sparsity:
        prepare_for_sparsity(model)
    return model.to(memory_format=_memory_format(run.train))


def _wrapped(model: nn.Module, settings: TrainSettings, world: World) -> nn.Module:
    """What the forward calls: ``model`` in DDP with several processes, compiled when asked
    (the frozen teacher is never wrapped)."""
    student = model
    if world.distributed:
        student = DistributedDataParallel(
            model, device_ids=[world.device] if world.device.type == "cuda" else None)
    if settings.compile:
        torch._dynamo.reset()  # no graph compiled for another model (or its hooks) is reused
        student = torch.compile(student, backend=settings.compile_backend)
    return student


def _distiller(run: RunConfig, task: Task, teacher: nn.Module, student: nn.Module,
               data: TrainingData, device: torch.device) -> Distiller:
    """The distiller, sized on the first two training samples of epoch 0 (drawn under their
    keys); its adapters initialised from the run's seed alone. Neither depends on what was
    built or drawn before (a teacher and data shared by several runs are built once)."""
    torch.manual_seed(int(np.random.SeedSequence([run.train.seed, 1]).generate_state(1)[0]))
    example = default_collate([data.loader.dataset[(0, index)] for index in range(2)])
    example = prepare_batch(example, device, run.train.channels_last)
    return Distiller(teacher, student, run.distillation,
                     example_inputs=task.model_inputs(example))


def uses_teacher(config: RunConfig) -> bool:
    """Whether the run uses a teacher (distillation terms, or a teacher for task losses)."""
    return bool(config.teacher or config.distillation)


def build_run(config: RunConfig, task: Task, world: World, teacher: nn.Module | None = None,
              data: TrainingData | None = None) -> Run:
    """A :class:`Run` at step 0, built from ``config`` on ``world``'s device; ``teacher``
    and ``data``: an already built teacher and training data to use (several students
    sharing them, :mod:`kdkit.training.lockstep`), else the run's own."""
    settings, device = config.train, world.device
    model = _student_model(config, task, device)
    data = data if data is not None else training_data(config, task, world)
    if uses_teacher(config):
        teacher = teacher if teacher is not None else build_teacher(config, task, device)
    else:
        teacher = None
    student = _wrapped(model, settings, world)
    distiller = (_distiller(config, task, teacher, student, data, device)
                 if config.distillation else None)
    extras = [p for m in (distiller.adapters, distiller.losses) for p in m.parameters()
              if p.requires_grad] if distiller else []
    parameters = [p for p in model.parameters() if p.requires_grad] + extras
    optimizer = _optimizer(parameters, settings, device)
    scaler = torch.amp.GradScaler(  # loss scaling for fp16 only
        device.type, enabled=amp_enabled(settings, device) and settings.amp_dtype == "fp16")
    return Run(config, task, world, data, model, student, teacher, distiller, parameters,
               extras, optimizer, _schedule(optimizer, settings), scaler,
               RandomStream.seeded(settings.seed, world.rank, device))
