"""One run being trained, as a loop sees it: its folder, built run, log and pace, and the
bookkeeping after each step (the non-finite check when due, log records, checkpoints,
evaluations) and at the end. :func:`kdkit.train.train` drives one session; the lockstep
loop (:mod:`kdkit.training.lockstep`) drives several on the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from tqdm import tqdm

from kdkit.config import RunConfig
from kdkit.distributed import World
from kdkit.errors import Interrupted
from kdkit.task import Task
from kdkit.training.evaluation import evaluate
from kdkit.training.folder import RunFolder
from kdkit.training.run import Run, TrainingData, build_run
from kdkit.training.runlog import Pace, RunLog, open_run_log, read_log
from kdkit.training.state import restore_state, save_checkpoint, save_weights
from kdkit.training.step import StepResult, check_finite
from kdkit.training.stop import signal_name, stop_requested

__all__ = ["Session", "open_session"]


@dataclass
class Session:
    """A built (and restored) run with its folder and open log; ``progress``: print."""

    run: Run
    folder: RunFolder
    log: RunLog
    progress: bool
    pace: Pace | None = None

    def final_metrics_logged(self) -> dict[str, float] | None:
        """A finished run's final metrics (saved weights and a logged final evaluation),
        else ``None``."""
        run, folder = self.run, self.folder
        logged = [r for r in read_log(folder.path, "eval") if r["step"] == run.step]
        if not (run.finished and folder.weights.exists() and logged):
            return None
        return {k: v for k, v in logged[-1].items() if k not in ("kind", "step")}

    def begin(self) -> None:
        """Before the first step: training mode, and the pace from the current step."""
        (self.run.distiller or self.run.student).train()
        self.pace = Pace(self.run.step)

    def after_step(self, result: StepResult) -> dict | None:
        """The bookkeeping after the step just taken: the non-finite check (every step on
        the CPU, every ``log_every`` steps on CUDA, and before any checkpoint or
        evaluation), skip records, the train record, the checkpoint and the evaluation as
        configured. Returns the train record when one was written."""
        run, settings = self.run, self.run.settings
        due_log = run.step % settings.log_every == 0 or run.finished
        due_checkpoint = bool(settings.checkpoint_every) and \
            run.step % settings.checkpoint_every == 0
        due_eval = bool(settings.eval_every) and run.step % settings.eval_every == 0 \
            and not run.finished
        skipped = []
        if due_log or due_checkpoint or due_eval or not run.skips_on_device:
            skipped = [step for step, _ in self._check_finite()]
        record = None
        if due_log and run.step not in skipped:
            record = {"kind": "train", "step": run.step, **result.values(),
                      "lr": run.schedule.get_last_lr()[0],
                      "ms_per_step": self.pace.lap(run.step)}
            self.log.write(record)
        if due_checkpoint:
            save_checkpoint(run, self.folder.checkpoint)
        if due_eval:
            metrics = self.evaluate()
            if self.progress:
                tqdm.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}"
                                                             for k, v in metrics.items()))
        return record

    def stop_signal(self) -> int | None:
        """The stop signal received (:mod:`kdkit.training.stop`), read after a step; under
        DDP all-reduced where the loop reads the device anyway (every step on the CPU,
        every ``log_every`` steps on CUDA), so every process stops at the same step."""
        run = self.run
        if run.world.distributed and run.skips_on_device and \
                run.step % run.settings.log_every:
            return None
        return stop_requested(run.world)

    def interrupt(self, signal: int) -> Interrupted:
        """Stop here: read the unchecked steps, save the checkpoint, log ``kind:
        interrupted``; returns the error for the loop to raise."""
        run = self.run
        self._check_finite()
        save_checkpoint(run, self.folder.checkpoint)
        self.log.write({"kind": "interrupted", "step": run.step, "signal": signal_name(signal)})
        return Interrupted(f"stopped by {signal_name(signal)} at step {run.step} of "
                           f"{run.settings.steps}; checkpoint saved in {self.folder.path}",
                           signal)

    def _check_finite(self) -> list[tuple[int, list[str]]]:
        """:func:`check_finite`, each skipped step logged (and printed)."""
        skipped = check_finite(self.run)
        for step, terms in skipped:
            self.log.write({"kind": "skip", "step": step, "terms": sorted(terms)})
            if self.progress:
                tqdm.write(f"{self.folder.path.name} step {step}: skipped, "
                           f"{terms or 'a loss on another process'} non-finite")
        return skipped

    def evaluate(self) -> dict[str, float]:
        """Evaluate the run's model now, and log the metrics at its step."""
        run = self.run
        metrics = evaluate(run.task, run.model, run.data.eval_set, run.config, run.device,
                           self.progress, run.world)
        self.log.write({"kind": "eval", "step": run.step, **metrics})
        return metrics

    def finish(self) -> dict[str, float]:
        """The final checkpoint, weights and evaluation."""
        save_checkpoint(self.run, self.folder.checkpoint)
        save_weights(self.run, self.folder.weights)
        return self.evaluate()


@contextmanager
def open_session(config: RunConfig, task: Task, folder: RunFolder, resume: bool,
                 progress: bool, world: World, teacher: nn.Module | None = None,
                 data: TrainingData | None = None) -> Iterator[Session]:
    """Check the folder, build the run (with ``teacher`` and ``data`` when shared) and
    restore its checkpoint, open its log and write the config: the session, for the
    block."""
    state = folder.resume_state(config, resume, world.device)
    run = build_run(config, task, world, teacher, data)
    if state is not None:
        restore_state(run, state, folder.checkpoint)
        if progress:
            print(f"resuming {folder.path} from step {run.step}")
    with open_run_log(folder.path, config.train.log, run.step, world.is_main) as log:
        folder.write_config(config)  # only once the model and its checkpoint have loaded
        yield Session(run, folder, log, progress)
