"""A task-agnostic training loop: optional distillation, mixed precision, gradient
clipping, multi-process data parallelism (``torchrun``), atomic checksummed checkpoints,
bit-exact resume, non-finite loss handling, progress and metric logging, and a graceful
stop on a scheduler's signals (:mod:`kdkit.training.stop`).

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
from kdkit.training.batch import cudnn_benchmark, to_device
from kdkit.training.evaluation import evaluate, metric_values, test_batches
from kdkit.training.folder import CHECKPOINT, WEIGHTS, RunFolder
from kdkit.training.run import build_model, resolve_device
from kdkit.training.runlog import LOG, read_log
from kdkit.training.session import Session, open_session
from kdkit.training.step import train_step
from kdkit.training.stop import stop_signals

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
        with stop_signals(), folder.claimed():
            return _train(run, task, folder, resume, progress and world.is_main, world)
    finally:
        end_world(world)


def _train(config: RunConfig, task: Task, folder: RunFolder, resume: bool, progress: bool,
           world: World) -> dict:
    """Open the run's session (folder checked, run built and restored, config written),
    then train to ``train.steps`` (a run that had finished returns its logged final
    metrics)."""
    with open_session(config, task, folder, resume, progress, world) as session:
        metrics = session.final_metrics_logged()
        if metrics is None:
            _loop(session)
            metrics = session.finish()
        elif progress:
            print(f"{folder.path} had finished at step {session.run.step}; its final metrics:")
    if progress:
        print(f"{folder.path}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics


def _loop(session: Session) -> None:
    """Step the session's run to ``train.steps``, its bookkeeping after each step; on a stop
    signal, checkpoint and raise :class:`~kdkit.errors.Interrupted` after the step."""
    run, steps = session.run, session.run.settings.steps
    batches = run.data.batches(run.step)
    session.begin()
    bar = tqdm(range(run.step, steps), initial=run.step, total=steps,
               desc=f"train {session.folder.path.name}", disable=not session.progress,
               mininterval=1.0)
    with cudnn_benchmark(run.device, True):
        for _ in bar:
            record = session.after_step(train_step(run, run.prepare(next(batches))))
            if record is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items()
                                 if k not in ("kind", "step")}, refresh=False)
            signal = None if run.finished else session.stop_signal()
            if signal is not None:
                raise session.interrupt(signal)
