"""A time budget for a comparison: from measured step times, the steps that fit.

``kdkit compare CONFIG --budget 8m`` (or ``budget:`` in the compare config) first takes a
short warm-up: a few steps of the teacher (when it is trained in the run) and of each unit
of student training (a lockstep chunk of rows, or a row trained alone) of the first seed,
timed after one untimed step (start-up, allocator, cuDNN's autotuning). :func:`plan_steps`
then scales the configured steps of the teacher and of the students by one factor, so that

    teacher_steps × teacher_s + seeds × student_steps × Σ unit_s  ≤  budget − spent − reserve

where ``spent`` is what the warm-up took and ``reserve`` the evaluation and report time
(:func:`evaluation_reserve`) plus the time to build the runs (measured in the warm-up, once
per seed and unit). Every student row gets the same steps. Everything here but
:func:`seconds_per_step` is arithmetic, tested with fake numbers; the clock is injected.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kdkit.config import RunConfig
from kdkit.distributed import World
from kdkit.errors import ConfigError
from kdkit.task import Task
from kdkit.training.evaluation import test_batches
from kdkit.training.lockstep import Lockstep, shared_parts
from kdkit.training.run import build_run

__all__ = ["REPORT_ALLOWANCE_S", "WARMUP_STEPS", "BudgetPlan", "evaluation_reserve",
           "group_timing", "image_seconds", "parse_duration", "plan_steps",
           "seconds_per_step", "synchronizer"]

#: Timed warm-up steps per run or group (after one untimed step).
WARMUP_STEPS = 3

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION = re.compile(r"^\s*(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>[smh]?)\s*$")

#: Seconds allowed for what the report does besides evaluating: FLOPs counts, CPU latency
#: of each architecture, figures (an estimate, not measured).
REPORT_ALLOWANCE_S = 30.0


def parse_duration(value: str | int | float, where: str = "budget") -> float:
    """Seconds in ``value``: a number of seconds, or ``"90s"``, ``"8m"``, ``"1h"``
    (a :class:`~kdkit.errors.ConfigError` naming ``where`` otherwise)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ConfigError(f"{where}: expected a duration such as 90s, 8m, 1h or plain "
                              f"seconds, found {value!r}")
        seconds = float(match["number"]) * _UNITS[match["unit"] or "s"]
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ConfigError(f"{where}: expected a positive duration, found {value!r}")
    return seconds


@dataclass
class BudgetPlan:
    """What a budget chose: the budget, the warm-up's measured seconds per step (the
    teacher's, ``None`` when it is not trained here; each student unit's by label), the
    warm-up's own time, the reserve for evaluation and report, the set-up time (building
    the teacher's run and every seed's units, as measured in the warm-up), and the
    steps."""

    budget_s: float
    teacher_step_s: float | None
    unit_step_s: dict[str, float]
    warmup_s: float
    reserve_s: float
    setup_s: float
    teacher_steps: int | None
    student_steps: int

    def lines(self) -> list[str]:
        """The plan in words, for the report."""
        units = ", ".join(f"{label} {1e3 * s:.1f}" for label, s in self.unit_step_s.items())
        teacher = ("" if self.teacher_step_s is None else
                   f"teacher {1e3 * self.teacher_step_s:.1f} ms/step → "
                   f"{self.teacher_steps} steps; ")
        return [f"Time budget {self.budget_s:g} s: warm-up took {self.warmup_s:.1f} s, "
                f"{self.reserve_s:.0f} s kept for evaluation and the report, "
                f"{self.setup_s:.0f} s for building the runs; {teacher}"
                f"students {self.student_steps} steps each. Measured ms/step per seed: "
                f"{units}."]


def plan_steps(budget_s: float, spent_s: float, reserve_s: float,
               teacher: tuple[int, float] | None, student_steps: int,
               unit_step_s: list[float], seeds: int) -> tuple[int | None, int]:
    """(teacher steps or ``None``, student steps) that fit ``budget_s − spent_s −
    reserve_s`` seconds: the configured ``teacher = (steps, seconds per step)`` (``None``
    when the teacher is not trained) and ``student_steps`` scaled by one factor; each seed
    takes every unit's step (``unit_step_s``) per student step. A budget too small for one
    step each is a :class:`ConfigError` saying how much would fit it."""
    available = budget_s - spent_s - reserve_s
    teacher_cost = 0.0 if teacher is None else teacher[0] * teacher[1]
    per_step = seeds * sum(unit_step_s)
    factor = available / (teacher_cost + student_steps * per_step)
    steps = math.floor(factor * student_steps)
    teacher_steps = None if teacher is None else math.floor(factor * teacher[0])
    if steps < 1 or (teacher_steps is not None and teacher_steps < 1):
        least = spent_s + reserve_s + per_step + (0 if teacher is None else teacher[1])
        raise ConfigError(
            f"budget: {budget_s:g} s leaves {available:.1f} s after the warm-up "
            f"({spent_s:.1f} s) and the evaluation reserve ({reserve_s:.1f} s), less than one "
            f"step of every run; give at least {math.ceil(least)} s, or fewer seeds or methods")
    return teacher_steps, steps


def evaluation_reserve(image_s: float, images: int, models: int) -> float:
    """Seconds kept for evaluation and the report: each model is evaluated twice over the
    ``images`` test images (its run's final evaluation, then the comparison's per-image
    one) at the measured ``image_s`` per image, plus :data:`REPORT_ALLOWANCE_S`."""
    return 2 * image_s * images * models + REPORT_ALLOWANCE_S


def seconds_per_step(step: Callable[[], None], steps: int, clock: Callable[[], float],
                     synchronize: Callable[[], None] = lambda: None) -> float:
    """Seconds per call of ``step`` over ``steps`` calls, after one untimed call;
    ``synchronize`` waits for the device (queued work counts)."""
    step()
    synchronize()
    started = clock()
    for _ in range(steps):
        step()
    synchronize()
    return (clock() - started) / steps


def synchronizer(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work (nothing on the CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else lambda: None


def group_timing(configs: Sequence[RunConfig], task: Task, world: World,
                 clock: Callable[[], float]) -> tuple[float, float]:
    """(seconds to build, seconds per training step) of ``configs`` stepping together (one
    lockstep chunk, or one run): throwaway runs (nothing is written; their folders are not
    touched) built (teacher, data and its pool, models) and stepped :data:`WARMUP_STEPS`
    times."""
    started = clock()
    teacher, data = shared_parts(configs, task, world)
    runs = [build_run(config, task, world, teacher, data) for config in configs]
    built = clock() - started
    for run in runs:
        (run.distiller or run.student).train()
    group, batches = Lockstep(runs, teacher), runs[0].data.batches(0)
    return built, seconds_per_step(lambda: group.step(runs, runs[0].prepare(next(batches))),
                                   WARMUP_STEPS, clock, synchronizer(world.device))


@torch.no_grad()
def image_seconds(model: torch.nn.Module, task: Task, dataset, device: torch.device,
                  clock: Callable[[], float]) -> float:
    """Seconds per evaluation forward of ``model`` on one test image (the first two
    images, or the only one twice: one untimed call, one timed)."""
    model.eval()
    batches = itertools.cycle(list(itertools.islice(test_batches(dataset, device), 2)))
    return seconds_per_step(lambda: model(*task.model_inputs(next(batches))), 1, clock,
                            synchronizer(device))
