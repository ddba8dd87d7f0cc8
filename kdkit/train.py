"""A task-agnostic training loop: optional distillation, mixed precision, gradient
clipping, multi-process data parallelism (``torchrun``), atomic checksummed checkpoints,
bit-exact resume, non-finite loss handling, progress and metric logging.

A run writes into ``out_dir``: ``checkpoint.pt`` (model, distiller adapters, optimizer,
schedule, scaler, step, random state; replaced atomically), ``model.pt`` (the final weights
alone), ``log.jsonl`` (one JSON record per logged step, per evaluation and per skipped
step) and ``config.yaml`` (the run's config). With several processes, rank 0 writes them.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from kdkit.checkpoint import load_checkpoint, load_weights, resolve_path, save_atomic
from kdkit.config import ConfigError, RunConfig, TrainSettings
from kdkit.distiller import Distiller
from kdkit.distributed import World, agree, average_gradients, end_world, setup_world
from kdkit.pruning import bn_l1_penalty, load_pruned, prepare_for_sparsity
from kdkit.sampling import KeyedSamples, ResumableSampler, endless_batches
from kdkit.task import Task

__all__ = [
    "resolve_device",
    "build_model",
    "evaluate",
    "metric_values",
    "read_log",
    "test_batches",
    "train",
    "to_device",
]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
LOG = "log.jsonl"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but no CUDA device is visible; use 'auto'")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _optimizer(parameters, run: RunConfig) -> torch.optim.Optimizer:
    settings = run.train
    if settings.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=settings.lr, momentum=0.9,
                               weight_decay=settings.weight_decay)
    raise ValueError(f"train.optimizer must be 'adam' or 'sgd', got {settings.optimizer!r}")


def _schedule(optimizer, run: RunConfig):
    steps = run.train.steps
    if run.train.schedule == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
    if run.train.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise ValueError(f"train.schedule must be 'cosine' or 'constant', got {run.train.schedule!r}")


def test_batches(dataset: Dataset, device: torch.device, num_workers: int = 0,
                 progress: bool = False, world: World | None = None) -> Iterator[Any]:
    """A dataset's samples one per batch (evaluation images may differ in size), on
    ``device``; with several processes, this process's share (every ``size``-th sample)."""
    if world is not None and world.distributed:
        dataset = Subset(dataset, range(world.rank, len(dataset), world.size))
    loader = DataLoader(dataset, batch_size=1, num_workers=num_workers)
    for batch in tqdm(loader, desc="evaluate", disable=not progress, leave=False):
        yield to_device(batch, device)


def metric_values(metrics) -> dict[str, float]:
    """A computed ``torchmetrics`` metric or collection as ``{name: float}``."""
    values = metrics.compute()
    values = values if isinstance(values, dict) else {"metric": values}
    return {name: float(value) for name, value in values.items()}


@torch.no_grad()
def evaluate(task: Task, model: nn.Module, dataset: Dataset, run: RunConfig,
             device: torch.device, progress: bool = True,
             world: World | None = None) -> dict[str, float]:
    """Metrics of ``model`` over ``dataset``, as plain floats (with several processes,
    each evaluates its share and torchmetrics combines them)."""
    was_training = model.training
    model.eval()
    metrics = task.metrics(run.metrics).to(device)
    for batch in test_batches(dataset, device, run.train.num_workers, progress, world):
        task.update_metrics(metrics, model(*task.model_inputs(batch)), batch)
    model.train(was_training)
    return metric_values(metrics)


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def read_log(run_dir: str | Path | None, kind: str) -> list[dict]:
    """The ``kind`` ("train" or "eval") records of a run's ``log.jsonl``, in order; none
    when the run has no log."""
    path = None if run_dir is None else Path(run_dir) / LOG
    if path is None or not path.exists():
        return []
    records = map(json.loads, path.read_text(encoding="utf-8").splitlines())
    return [record for record in records if record.get("kind") == kind]


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


def _build_teacher(task: Task, run: RunConfig, device: torch.device) -> nn.Module:
    if not run.teacher or "model" not in run.teacher or "checkpoint" not in run.teacher:
        raise ValueError(
            "a run with a teacher or distillation terms needs 'teacher: {model: {...}, "
            "checkpoint: PATH}' (train the teacher first with its own config)"
        )
    teacher = build_model(task, run.teacher["model"])
    return load_weights(teacher, run.teacher["checkpoint"]).to(device)


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
MAX_CONSECUTIVE_SKIPS = 10


def _check_settings(settings: TrainSettings) -> None:
    if settings.amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"train.amp_dtype must be fp16 or bf16, got {settings.amp_dtype!r}")
    if settings.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(f"train.on_nonfinite must be 'stop' or 'skip', got "
                          f"{settings.on_nonfinite!r}")


def _channels_last(batch: Any) -> Any:
    """4-D floating-point tensors of a (nested) batch in channels-last memory format."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_channels_last(v) for v in batch)
    return batch


def train(run: RunConfig, task: Task, resume: bool = True, progress: bool = True) -> dict:
    """Train ``run``'s model on ``task``; returns the final evaluation metrics. Under
    ``torchrun`` every process calls this; see :mod:`kdkit.distributed`."""
    _check_settings(run.train)
    world = setup_world(resolve_device(run.train.device))
    try:
        return _train(run, task, resume, progress and world.is_main, world)
    finally:
        end_world(world)


def _train(run: RunConfig, task: Task, resume: bool, progress: bool, world: World) -> dict:
    settings, device = run.train, world.device
    out_dir = Path(run.out_dir)
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    torch.manual_seed(settings.seed)
    model = build_model(task, run.model).to(device)
    if run.sparsity:
        prepare_for_sparsity(model)
    memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    def prepare(batch: Any) -> Any:
        batch = to_device(batch, device)
        return _channels_last(batch) if settings.channels_last else batch

    train_set, eval_set = task.datasets(run.data)
    sampler = ResumableSampler(len(train_set), settings.seed, world.rank, world.size)
    loader = DataLoader(KeyedSamples(train_set, settings.seed),
                        batch_size=settings.batch_size, sampler=sampler,
                        num_workers=settings.num_workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    teacher = None
    if run.teacher or run.distillation:
        teacher = _build_teacher(task, run, device).to(memory_format=memory_format)
        teacher.eval().requires_grad_(False)
    student: nn.Module = model  # the frozen teacher is never wrapped
    if world.distributed:
        student = DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if settings.compile:
        torch._dynamo.reset()  # no graph compiled for another model (or its hooks) is reused
        student = torch.compile(student, backend=settings.compile_backend)
    distiller = None
    if run.distillation:
        example = prepare(next(iter(DataLoader(train_set, batch_size=2))))
        distiller = Distiller(teacher, student, run.distillation,
                              example_inputs=task.model_inputs(example))
    extras = [p for m in (distiller.adapters, distiller.losses) for p in m.parameters()
              if p.requires_grad] if distiller else []
    parameters = [p for p in model.parameters() if p.requires_grad] + extras
    optimizer = _optimizer(parameters, run)
    schedule = _schedule(optimizer, run)
    amp_dtype = AMP_DTYPES[settings.amp_dtype]
    amp = settings.amp and (device.type == "cuda" or amp_dtype == torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)
    step = 0
    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        if distiller is not None and "distiller" not in state:
            raise ValueError(f"{checkpoint_path} holds no distillation adapters (another run's "
                             "or an older kdkit's checkpoint); start afresh with --no-resume")
        model.load_state_dict(state["model"])
        if distiller is not None:
            distiller.adapters.load_state_dict(state["distiller"]["adapters"])
            distiller.losses.load_state_dict(state["distiller"]["losses"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        if device.type == "cuda" and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), device)
        step = int(state["step"])
        if progress:
            print(f"resuming {out_dir} from step {step}")
    last_checkpoint = step

    def checkpoint(at: int) -> None:
        nonlocal last_checkpoint
        last_checkpoint = at
        if not world.is_main:
            return
        payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                   "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                   "step": at, "rng": torch.get_rng_state()}
        if distiller is not None:
            payload["distiller"] = {"adapters": distiller.adapters.state_dict(),
                                    "losses": distiller.losses.state_dict()}
        if device.type == "cuda":
            payload["cuda_rng"] = torch.cuda.get_rng_state(device)
        save_atomic(payload, checkpoint_path)

    def log(record: dict) -> None:
        if world.is_main:
            _log(out_dir / LOG, record)

    batches = endless_batches(loader, sampler, settings.batch_size, step)
    (distiller or student).train()
    bar = tqdm(range(step, settings.steps), initial=step, total=settings.steps,
               desc=f"train {out_dir.name}", disable=not progress, mininterval=1.0)
    started, skipped_in_a_row = time.perf_counter(), 0
    for step in bar:
        batch = prepare(next(batches))
        done = step + 1
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            inputs = task.model_inputs(batch)
            if distiller is not None:
                out = distiller(*inputs)
                prediction, teacher_prediction = out.student_output, out.teacher_output
                terms = {k: v for k, v in out.losses.items() if k != "total"}
            else:
                prediction, teacher_prediction, terms = student(*inputs), None, {}
                if teacher is not None:  # a teacher for the task losses alone
                    with torch.no_grad():
                        teacher_prediction = teacher(*inputs)
            terms = {**task.losses(prediction, batch, teacher_prediction, run.loss), **terms}
            if run.sparsity:
                terms["bn_l1"] = bn_l1_penalty(model, run.sparsity)
        total = sum(terms.values())
        skip = agree(not bool(torch.isfinite(total)), world)
        if skip:
            bad = {k: v.item() for k, v in terms.items() if not torch.isfinite(v)}
            where = f"loss term(s) {bad}" if bad else "a loss on another process"
            if settings.on_nonfinite == "stop":
                raise FloatingPointError(
                    f"{where} became non-finite at step {done}; the run stopped. The last "
                    f"checkpoint (step {last_checkpoint}) is intact: resume from it with a "
                    "lower train.lr or a train.grad_clip, or set train.on_nonfinite: skip")
            skipped_in_a_row += 1
            log({"kind": "skip", "step": done, "terms": sorted(bad)})
            if world.is_main:
                tqdm.write(f"step {done}: skipped, {where} non-finite")
            if skipped_in_a_row >= MAX_CONSECUTIVE_SKIPS:
                raise FloatingPointError(
                    f"{where} stayed non-finite for {skipped_in_a_row} steps in a row (to step "
                    f"{done}); the run stopped. The last checkpoint (step {last_checkpoint}) "
                    "is intact; lower train.lr or add train.grad_clip")
        else:
            skipped_in_a_row = 0
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()  # also when skipping: DDP expects every backward
        if skip:
            optimizer.zero_grad(set_to_none=True)
        else:
            average_gradients(extras, world)
            if settings.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        schedule.step()
        if not skip and (done % settings.log_every == 0 or done == settings.steps):
            record = {"step": done, "total": total.item(),
                      **{k: v.item() for k, v in terms.items()},
                      "lr": schedule.get_last_lr()[0],
                      "ms_per_step": 1e3 * (time.perf_counter() - started) / settings.log_every}
            started = time.perf_counter()
            log({"kind": "train", **record})
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"},
                            refresh=False)
        if settings.checkpoint_every and done % settings.checkpoint_every == 0:
            checkpoint(done)
        if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
            metrics = evaluate(task, model, eval_set, run, device, progress, world)
            log({"kind": "eval", "step": done, **metrics})
            if progress:
                tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}"
                                                         for k, v in metrics.items()))
    checkpoint(settings.steps)
    if world.is_main:
        save_atomic({"model": model.state_dict()}, out_dir / WEIGHTS)
    metrics = evaluate(task, model, eval_set, run, device, progress, world)
    log({"kind": "eval", "step": settings.steps, **metrics})
    if progress:
        print(f"{out_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
