"""One optimizer step of a built run on a batch: forward, loss terms, backward, gradient
averaging, clipping, the optimizer and the schedule; and the non-finite policy.

:func:`train_step` takes the :class:`~kdkit.training.run.Run`, a prepared batch and,
optionally, the teacher's pass over it shared by several students (lockstep), and returns
the step's terms; it keeps no state of its own, so several runs can step on the same batch.
It runs inside the run's own random stream.

Non-finite losses without a host synchronisation per step. Each step computes, on the
device, a flag: the total is not finite (on some process: all-reduced with MAX). A flagged
step never changes the weights nor the optimizer's state:

- on CUDA (:attr:`Run.skips_on_device`) the optimizer is the fused one and the flag is its
  ``found_inf`` (GradScaler's protocol): the fused kernel skips the update, and undoes its
  step count, on the device. Nothing waits for the device.
- on the CPU the host reads the flag before the update and skips it (reading a CPU value
  waits for nothing).

The run keeps each step's flag and detached terms in ``run.unchecked``; :func:`check_finite`
reads them all at once (one synchronisation), names each skipped step and its non-finite
terms, and applies ``train.on_nonfinite``: ``stop`` raises at the first, ``skip`` raises
after :data:`MAX_CONSECUTIVE_SKIPS` in a row. The loop calls it every ``log_every`` steps on
CUDA (every step on the CPU), and always before a checkpoint, an evaluation and the end, so a
checkpoint never follows an unread non-finite step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kdkit.config import TEACHER_PREFIX
from kdkit.distiller import TeacherPass
from kdkit.distributed import average_gradients
from kdkit.errors import NonFiniteLossError
from kdkit.pruning import bn_l1_penalty
from kdkit.training.run import Run

__all__ = ["MAX_CONSECUTIVE_SKIPS", "StepResult", "check_finite", "ground_truth_loss",
           "loss_terms", "train_step"]

MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class StepResult:
    """A step's loss terms: ``task_terms`` are the task's own losses (weighted; see
    :func:`ground_truth_loss` for the comparable ``task_loss``), ``extra_terms`` the
    distillation terms and ``bn_l1``. ``total`` is what was minimised; ``nonfinite``: a
    device flag (0-dim float), 1 when the total was not finite on some process and the
    update was skipped (read by :func:`check_finite`); ``loss_weights``: the task's loss
    weights of the step (:attr:`Run.loss_weights`)."""

    task_terms: dict[str, torch.Tensor]
    extra_terms: dict[str, torch.Tensor]
    total: torch.Tensor
    nonfinite: torch.Tensor
    loss_weights: dict[str, Any]

    @property
    def terms(self) -> dict[str, torch.Tensor]:
        """Every named term (a distillation term shadows a task term of the same name)."""
        return {**self.task_terms, **self.extra_terms}

    def values(self) -> dict[str, float]:
        """``total``, ``task_loss`` (:func:`ground_truth_loss` under the step's loss
        weights) and every term as plain floats (a host sync)."""
        return {"total": self.total.item(),
                "task_loss": ground_truth_loss(self.task_terms, self.loss_weights).item(),
                **{name: value.item() for name, value in self.terms.items()}}


def ground_truth_loss(task_terms: dict[str, torch.Tensor],
                      loss_spec: dict[str, Any]) -> torch.Tensor:
    """The task's terms against the ground truth, unweighted: each term not named
    ``teacher_*`` divided by its weight in ``loss_spec`` (a term absent from it counts
    with weight 1; see :class:`kdkit.task.Task`). A method's own weights (``alpha: 0.5``
    beside ``teacher_alpha: 0.5``) then leave it unchanged, so its curve compares across
    methods. Scalar tensors → scalar tensor."""
    parts = [value / float(loss_spec.get(name, 1.0)) for name, value in task_terms.items()
             if not name.startswith(TEACHER_PREFIX)]
    return sum(parts, torch.zeros(()))


def loss_terms(run: Run, batch: Any, teacher: TeacherPass | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The forward under the run's autocast: the task's loss terms (under
    :attr:`Run.loss_weights`), and the distillation terms plus ``bn_l1`` (with
    ``sparsity``). ``teacher``: the teacher's pass over this batch when it was computed once
    for several runs; else the run makes its own. Once the run stops distilling
    (:attr:`Run.distilling`), the teacher is not run and the distillation terms are gone."""
    config = run.config
    distilling = run.distilling
    with run.autocast():
        inputs = run.task.model_inputs(batch)
        extra: dict[str, torch.Tensor] = {}
        teacher_prediction = None
        if run.distiller is not None and distilling:
            if teacher is None:
                teacher = run.distiller.teacher_pass(*inputs)
            out = run.distiller.student_losses(teacher, *inputs)
            prediction, teacher_prediction = out.student_output, out.teacher_output
            extra = {k: v for k, v in out.losses.items() if k != "total"}
        else:
            prediction = run.student(*inputs)
            if distilling and teacher is not None:
                teacher_prediction = teacher.output
            elif distilling:  # a teacher for the task losses alone
                with torch.no_grad():
                    teacher_prediction = run.teacher(*inputs)
        task_terms = run.task.losses(prediction, batch, teacher_prediction, run.loss_weights)
        if config.sparsity:
            extra["bn_l1"] = bn_l1_penalty(run.model, config.sparsity)
    return task_terms, extra


def _checkpoint_note(run: Run) -> str:
    if run.last_checkpoint is None:
        return "No checkpoint was written yet: run it again"
    return f"The last checkpoint (step {run.last_checkpoint}) is intact: resume from it"


def _refuse_or_count(run: Run, step: int, nonfinite: list[str]) -> None:
    """The non-finite policy for skipped ``step``: ``stop`` raises; ``skip`` counts, and
    raises after :data:`MAX_CONSECUTIVE_SKIPS` in a row."""
    where = (f"loss term(s) {sorted(nonfinite)}" if nonfinite
             else "a loss on another process")
    if run.settings.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"{where} became non-finite at step {step}; the run stopped. "
            f"{_checkpoint_note(run)} with a lower train.lr or a train.grad_clip, or set "
            "train.on_nonfinite: skip")
    run.skipped_in_a_row += 1
    if run.skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteLossError(
            f"{where} stayed non-finite for {run.skipped_in_a_row} steps in a row (to step "
            f"{step}); the run stopped. {_checkpoint_note(run)} with a lower train.lr or a "
            "train.grad_clip")


def check_finite(run: Run) -> list[tuple[int, list[str]]]:
    """Read the flags of the steps taken since the last check (one synchronisation) and
    apply ``train.on_nonfinite`` to each skipped one (raising
    :class:`~kdkit.errors.NonFiniteLossError` as it says); returns the skipped steps as
    ``(step, names of the terms not finite here)``."""
    if not run.unchecked:
        return []
    entries, run.unchecked = run.unchecked, []
    flags = torch.stack([flag for _, flag, _ in entries]).tolist()
    skipped = []
    for (step, _, terms), flag in zip(entries, flags):
        if not flag:
            run.skipped_in_a_row = 0
            continue
        nonfinite = [name for name, value in terms.items() if not torch.isfinite(value)]
        _refuse_or_count(run, step, nonfinite)
        skipped.append((step, nonfinite))
    return skipped


def _nonfinite_flag(total: torch.Tensor, run: Run) -> torch.Tensor:
    """1.0 (a 0-dim float on the device) when ``total`` is not finite on some process."""
    flag = (~torch.isfinite(total.detach())).float()
    if run.world.distributed:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def _apply(run: Run) -> None:
    """Average the extras' gradients, clip, step the optimizer and the loss scaler."""
    optimizer, scaler = run.optimizer, run.scaler
    average_gradients(run.extras, run.world)
    if run.settings.grad_clip:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(run.parameters, run.settings.grad_clip)
    scaler.step(optimizer)
    scaler.update()


def _update(run: Run, total: torch.Tensor, nonfinite: torch.Tensor) -> None:
    """Backward (also on a flagged step: DDP expects every process's backward), the update
    unless ``nonfinite`` (skipped on the device or by the host, see the module docstring),
    and the schedule's step."""
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if not run.skips_on_device:
        if not bool(nonfinite):
            _apply(run)
    elif run.scaler.is_enabled():  # fp16: the scaler gives the fused step its own found_inf,
        _apply(run)                # which a non-finite loss's gradients set
    else:
        run.optimizer.found_inf = nonfinite  # read by the fused step: no update where set
        try:
            _apply(run)
        finally:
            del run.optimizer.found_inf
    run.schedule.step()


def train_step(run: Run, batch: Any, teacher: TeacherPass | None = None) -> StepResult:
    """One step of ``run`` on a prepared ``batch`` (see :meth:`Run.prepare`) in the run's
    random stream, with ``teacher``'s pass over the batch when shared; advances
    ``run.step``. A non-finite total (on any process) skips the update; the policy is
    applied when :func:`check_finite` reads the flag."""
    with run.random.active():
        weights = run.loss_weights
        task_terms, extra_terms = loss_terms(run, batch, teacher)
        total = sum({**task_terms, **extra_terms}.values())
        result = StepResult(task_terms, extra_terms, total, _nonfinite_flag(total, run),
                            weights)
        _update(run, total, result.nonfinite)
    run.step += 1
    run.unchecked.append((run.step, result.nonfinite,
                          {name: value.detach() for name, value in result.terms.items()}))
    return result
