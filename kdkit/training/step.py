"""One optimizer step of a built run on a batch: forward, loss terms, the non-finite
policy, backward, gradient averaging, clipping, the optimizer and the schedule.

:func:`train_step` takes the :class:`~kdkit.training.run.Run` and a prepared batch and
returns the step's terms; it keeps no state of its own, so several runs (students in
lockstep) can step on the same batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdkit.distributed import agree, average_gradients
from kdkit.errors import NonFiniteLossError
from kdkit.pruning import bn_l1_penalty
from kdkit.training.run import Run

__all__ = ["MAX_CONSECUTIVE_SKIPS", "StepResult", "ground_truth_loss", "loss_terms", "train_step"]

MAX_CONSECUTIVE_SKIPS = 10


@dataclass
class StepResult:
    """A step's loss terms: ``task_terms`` are the task's own losses (weighted; see
    :func:`ground_truth_loss` for the comparable ``task_loss``), ``extra_terms`` the
    distillation terms and ``bn_l1``. ``total`` is what was minimised; ``skipped``: it was
    not finite somewhere (on some process), so no update was made; ``nonfinite`` names the
    terms that were not finite here."""

    task_terms: dict[str, torch.Tensor]
    extra_terms: dict[str, torch.Tensor]
    total: torch.Tensor
    skipped: bool
    nonfinite: list[str]

    @property
    def terms(self) -> dict[str, torch.Tensor]:
        """Every named term (a distillation term shadows a task term of the same name)."""
        return {**self.task_terms, **self.extra_terms}

    def values(self, loss_spec: dict[str, Any]) -> dict[str, float]:
        """``total``, ``task_loss`` (:func:`ground_truth_loss` under ``loss_spec``, the
        run's ``loss:`` weights) and every term as plain floats (a host sync)."""
        return {"total": self.total.item(),
                "task_loss": ground_truth_loss(self.task_terms, loss_spec).item(),
                **{name: value.item() for name, value in self.terms.items()}}


def ground_truth_loss(task_terms: dict[str, torch.Tensor],
                      loss_spec: dict[str, Any]) -> torch.Tensor:
    """The task's terms against the ground truth, unweighted: each term not named
    ``teacher_*`` divided by its weight in ``loss_spec`` (a term absent from it counts
    with weight 1; see :class:`kdkit.task.Task`). A method's own weights (``alpha: 0.5``
    beside ``teacher_alpha: 0.5``) then leave it unchanged, so its curve compares across
    methods. Scalar tensors → scalar tensor."""
    parts = [value / float(loss_spec.get(name, 1.0)) for name, value in task_terms.items()
             if not name.startswith("teacher_")]
    return sum(parts, torch.zeros(()))


def loss_terms(run: Run, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The forward under the run's autocast: the task's loss terms, and the distillation
    terms plus ``bn_l1`` (with ``sparsity``)."""
    config = run.config
    with run.autocast():
        inputs = run.task.model_inputs(batch)
        extra: dict[str, torch.Tensor] = {}
        if run.distiller is not None:
            out = run.distiller(*inputs)
            prediction, teacher_prediction = out.student_output, out.teacher_output
            extra = {k: v for k, v in out.losses.items() if k != "total"}
        else:
            prediction, teacher_prediction = run.student(*inputs), None
            if run.teacher is not None:  # a teacher for the task losses alone
                with torch.no_grad():
                    teacher_prediction = run.teacher(*inputs)
        task_terms = run.task.losses(prediction, batch, teacher_prediction, config.loss)
        if config.sparsity:
            extra["bn_l1"] = bn_l1_penalty(run.model, config.sparsity)
    return task_terms, extra


def _checkpoint_note(run: Run) -> str:
    if run.last_checkpoint is None:
        return "No checkpoint was written yet: run it again"
    return f"The last checkpoint (step {run.last_checkpoint}) is intact: resume from it"


def _refuse_or_count(run: Run, result: StepResult) -> None:
    """The non-finite policy for a skipped step: ``stop`` raises; ``skip`` counts, and
    raises after :data:`MAX_CONSECUTIVE_SKIPS` in a row."""
    done = run.step + 1
    where = (f"loss term(s) {sorted(result.nonfinite)}" if result.nonfinite
             else "a loss on another process")
    if run.settings.on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"{where} became non-finite at step {done}; the run stopped. "
            f"{_checkpoint_note(run)} with a lower train.lr or a train.grad_clip, or set "
            "train.on_nonfinite: skip")
    run.skipped_in_a_row += 1
    if run.skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
        raise NonFiniteLossError(
            f"{where} stayed non-finite for {run.skipped_in_a_row} steps in a row (to step "
            f"{done}); the run stopped. {_checkpoint_note(run)} with a lower train.lr or a "
            "train.grad_clip")


def _update(run: Run, total: torch.Tensor, skipped: bool) -> None:
    """Backward (also when skipping: DDP expects every process's backward), then, unless
    skipped, average the extras' gradients, clip, step the optimizer; step the schedule."""
    optimizer, scaler = run.optimizer, run.scaler
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
    else:
        average_gradients(run.extras, run.world)
        if run.settings.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(run.parameters, run.settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
    run.schedule.step()


def train_step(run: Run, batch: Any) -> StepResult:
    """One step of ``run`` on a prepared ``batch`` (see :meth:`Run.prepare`); advances
    ``run.step``. A non-finite total (on any process) skips the update or raises
    :class:`~kdkit.errors.NonFiniteLossError`, as ``train.on_nonfinite`` says."""
    task_terms, extra_terms = loss_terms(run, batch)
    total = sum({**task_terms, **extra_terms}.values())
    result = StepResult(task_terms, extra_terms, total,
                        skipped=agree(not bool(torch.isfinite(total)), run.world), nonfinite=[])
    if result.skipped:
        result.nonfinite = [k for k, v in result.terms.items() if not torch.isfinite(v)]
        _refuse_or_count(run, result)
    else:
        run.skipped_in_a_row = 0
    _update(run, total, result.skipped)
    run.step += 1
    return result
