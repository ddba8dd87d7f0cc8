"""A task-agnostic training loop: optional distillation, mixed precision, gradient
clipping, multi-process data parallelism (``torchrun``), atomic checksummed checkpoints,
bit-exact resume, non-finite loss handling, progress and metric logging.

A run writes into ``out_dir``: ``checkpoint.pt`` (model, distiller adapters, optimizer,
schedule, scaler, step, every process's random state; replaced atomically), ``model.pt``
(the final weights alone), ``log.jsonl`` (one JSON record per logged step, per evaluation
and per skipped step; with ``train.log: [jsonl, tensorboard]`` also TensorBoard scalars in
``tensorboard/``) and ``config.yaml`` (the run's config). With several processes, rank 0
writes them. :func:`train` composes the parts in :mod:`kdkit.training` (see there): check
the folder, build the run, restore its state, then step, log, checkpoint and evaluate.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from kdkit.config import RunConfig
from kdkit.distributed import World, end_world, setup_world
from kdkit.task import Task
from kdkit.training.batch import to_device
from kdkit.training.evaluation import evaluate, metric_values, test_batches
from kdkit.training.folder import CHECKPOINT, WEIGHTS, RunFolder
from kdkit.training.run import Run, build_model, build_run, resolve_device
from kdkit.training.runlog import LOG, Pace, RunLog, open_run_log, read_log
from kdkit.training.state import restore_state, save_checkpoint, save_weights
from kdkit.training.step import StepResult, train_step

__all__ = [
    "CHECKPOINT",
    "LOG",
    "WEIGHTS",
    "resolve_device",
    "build_model",
    "evaluate",
    "metric_values",
    "read_log",
    "test_batches",
    "train",
    "to_device",
]


def train(run: RunConfig, task: Task, resume: bool = True, progress: bool = True) -> dict:
    """Train ``run``'s model on ``task``; returns the final evaluation metrics. Resumes
    ``run.out_dir``'s checkpoint when its config allows (see :mod:`kdkit.training.folder`);
    a finished run returns its final metrics without training; ``resume=False`` starts
    over. Under ``torchrun`` every process calls this; see :mod:`kdkit.distributed`."""
    world = setup_world(resolve_device(run.train.device))
    folder = RunFolder(Path(run.out_dir), world.is_main)
    try:
        with folder.claimed():
            return _train(run, task, folder, resume, progress and world.is_main, world)
    finally:
        end_world(world)


def _train(config: RunConfig, task: Task, folder: RunFolder, resume: bool, progress: bool,
           world: World) -> dict:
    """Check the folder, build the run and restore its checkpoint, write the config, then
    train to ``train.steps`` (a run that had finished returns its logged final metrics)."""
    state = folder.resume_state(config, resume, world.device)
    run = build_run(config, task, world)
    if state is not None:
        restore_state(run, state, folder.checkpoint)
        if progress:
            print(f"resuming {folder.path} from step {run.step}")
    with open_run_log(folder.path, config.train.log, run.step, world.is_main) as log:
        folder.write_config(config)  # only once the model and its checkpoint have loaded
        metrics = _final_metrics_logged(run, folder)
        if metrics is None:
            _loop(run, folder, log, progress)
            metrics = _finish(run, folder, log, progress)
        elif progress:
            print(f"{folder.path} had finished at step {run.step}; its final metrics:")
    if progress:
        print(f"{folder.path}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _final_metrics_logged(run: Run, folder: RunFolder) -> dict[str, float] | None:
    """A finished run's final metrics (saved weights and a logged final evaluation), else
    ``None``."""
    logged = [r for r in read_log(folder.path, "eval") if r["step"] == run.step]
    if not (run.finished and folder.weights.exists() and logged):
        return None
    return {k: v for k, v in logged[-1].items() if k not in ("kind", "step")}


def _train_record(run: Run, result: StepResult, pace: Pace) -> dict:
    """The ``kind: train`` log record of the step just taken."""
    return {"kind": "train", "step": run.step, **result.values(run.config.loss),
            "lr": run.schedule.get_last_lr()[0], "ms_per_step": pace.lap(run.step)}


def _evaluate(run: Run, log: RunLog, progress: bool) -> dict[str, float]:
    """Evaluate the run's model now, and log the metrics at its step."""
    metrics = evaluate(run.task, run.model, run.data.eval_set, run.config, run.device,
                       progress, run.world)
    log.write({"kind": "eval", "step": run.step, **metrics})
    return metrics


def _loop(run: Run, folder: RunFolder, log: RunLog, progress: bool) -> None:
    """Step ``run`` to ``train.steps``: log, checkpoint and evaluate as configured."""
    settings = run.settings
    batches = run.data.batches(run.step)
    (run.distiller or run.student).train()
    pace = Pace(run.step)
    bar = tqdm(range(run.step, settings.steps), initial=run.step, total=settings.steps,
               desc=f"train {folder.path.name}", disable=not progress, mininterval=1.0)
    for _ in bar:
        result = train_step(run, run.prepare(next(batches)))
        if result.skipped:
            log.write({"kind": "skip", "step": run.step, "terms": sorted(result.nonfinite)})
            if run.world.is_main:
                where = result.nonfinite or "a loss on another process"
                tqdm.write(f"step {run.step}: skipped, {where} non-finite")
        elif run.step % settings.log_every == 0 or run.finished:
            record = _train_record(run, result, pace)
            log.write(record)
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                             if k not in ("kind", "step")}, refresh=False)
        if settings.checkpoint_every and run.step % settings.checkpoint_every == 0:
            save_checkpoint(run, folder.checkpoint)
        if settings.eval_every and run.step % settings.eval_every == 0 and not run.finished:
            metrics = _evaluate(run, log, progress)
            if progress:
                tqdm.write(f"step {run.step}: " + ", ".join(f"{k} {v:.4g}"
                                                             for k, v in metrics.items()))


def _finish(run: Run, folder: RunFolder, log: RunLog, progress: bool) -> dict[str, float]:
    """The final checkpoint, weights and evaluation."""
    save_checkpoint(run, folder.checkpoint)
    save_weights(run, folder.weights)
    return _evaluate(run, log, progress)
