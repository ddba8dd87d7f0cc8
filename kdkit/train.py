"""A task-agnostic training loop: optional distillation, AMP on GPU, gradient clipping,
atomic checkpoints, resume, progress and metric logging.

A run writes into ``out_dir``: ``checkpoint.pt`` (model, optimizer, schedule, scaler, step,
random state; replaced atomically), ``model.pt`` (the final weights alone), ``log.jsonl``
(one JSON record per logged step and per evaluation) and ``config.yaml`` (the run's config).
"""

from __future__ import annotations

import importlib.resources
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file as load_safetensors
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from kdkit.config import RunConfig
from kdkit.distiller import Distiller
from kdkit.pruning import bn_l1_penalty, load_pruned, prepare_for_sparsity
from kdkit.task import Task

__all__ = [
    "resolve_device",
    "save_atomic",
    "load_checkpoint",
    "load_weights",
    "resolve_path",
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


def save_atomic(payload: dict, path: Path) -> None:
    """Write ``payload`` with ``torch.save`` to a temporary file, then rename it over
    ``path``: a crash leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    """Load a checkpoint without running code (``weights_only=True``); a missing,
    truncated or foreign file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises several types for corrupt archives
        raise ValueError(
            f"could not read checkpoint {path} (truncated, corrupt, or not a kdkit checkpoint "
            f"made of tensors): {error}"
        ) from None


def resolve_path(path: str | Path) -> Path:
    """A file path, or ``package.module:file`` for a file shipped inside a package."""
    text = str(path)
    module, colon, name = text.partition(":")
    if colon and not Path(text).exists() and module.replace(".", "").isidentifier():
        return Path(str(importlib.resources.files(module) / name))
    return Path(path)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights into ``model`` from a ``model.pt``, a full ``checkpoint.pt`` or a
    ``.safetensors`` file (any float dtype; converted to the model's)."""
    path = resolve_path(path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"weights not found: {path}")
        state = load_safetensors(path)
    else:
        payload = load_checkpoint(path)
        state = payload.get("model", payload) if isinstance(payload, dict) else payload
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: missing "
            f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}; check that the config "
            "builds the same model the checkpoint was trained with"
        )
    return model


class ResumableSampler(Sampler[int]):
    """A fresh permutation per epoch from ``(seed, epoch)``, startable mid-epoch, so a
    resumed run sees exactly the samples an uninterrupted one would."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed = length, seed
        self.epoch, self.start = 0, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        yield from order[self.start:]

    def __len__(self) -> int:
        return self.length - self.start


def _batches(loader: DataLoader, sampler: ResumableSampler, batch_size: int, step: int):
    """Endless batches, positioned at ``step`` (whole batches per epoch, the rest dropped)."""
    batches_per_epoch = sampler.length // batch_size
    if batches_per_epoch == 0:
        raise ValueError(
            f"the training set has {sampler.length} samples, fewer than one batch of "
            f"{batch_size}; lower train.batch_size or add data"
        )
    sampler.epoch, offset = divmod(step, batches_per_epoch)
    sampler.start = offset * batch_size
    while True:
        yield from loader
        sampler.epoch, sampler.start = sampler.epoch + 1, 0


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
                 progress: bool = False) -> Iterator[Any]:
    """A dataset's samples one per batch (evaluation images may differ in size), on
    ``device``."""
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
             device: torch.device, progress: bool = True) -> dict[str, float]:
    """Metrics of ``model`` over ``dataset``, as plain floats."""
    was_training = model.training
    model.eval()
    metrics = task.metrics(run.metrics).to(device)
    for batch in test_batches(dataset, device, run.train.num_workers, progress):
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


def train(run: RunConfig, task: Task, resume: bool = True, progress: bool = True) -> dict:
    """Train ``run``'s model on ``task``; returns the final evaluation metrics."""
    settings = run.train
    device = resolve_device(settings.device)
    out_dir = Path(run.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(run.to_dict(), sort_keys=False))
    torch.manual_seed(settings.seed)
    model = build_model(task, run.model).to(device)
    if run.sparsity:
        prepare_for_sparsity(model)
    train_set, eval_set = task.datasets(run.data)
    sampler = ResumableSampler(len(train_set), settings.seed)
    loader = DataLoader(train_set, batch_size=settings.batch_size, sampler=sampler,
                        num_workers=settings.num_workers, drop_last=True,
                        pin_memory=device.type == "cuda")
    distiller = None
    module: nn.Module = model
    teacher = _build_teacher(task, run, device) if run.teacher or run.distillation else None
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    if run.distillation:
        example = to_device(next(iter(DataLoader(train_set, batch_size=2))), device)
        distiller = Distiller(teacher, model, run.distillation,
                              example_inputs=task.model_inputs(example))
        module = distiller
    parameters = distiller.trainable_parameters() if distiller else list(model.parameters())
    optimizer = _optimizer(parameters, run)
    schedule = _schedule(optimizer, run)
    amp = settings.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    step = 0
    checkpoint_path = out_dir / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = load_checkpoint(checkpoint_path, device)
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        step = int(state["step"])
        if progress:
            print(f"resuming {out_dir} from step {step}")

    def checkpoint(at: int) -> None:
        save_atomic({"model": module.state_dict(), "optimizer": optimizer.state_dict(),
                     "schedule": schedule.state_dict(), "scaler": scaler.state_dict(),
                     "step": at, "rng": torch.get_rng_state()}, checkpoint_path)

    log_path = out_dir / LOG
    batches = _batches(loader, sampler, settings.batch_size, step)
    module.train()
    bar = tqdm(range(step, settings.steps), initial=step, total=settings.steps,
               desc=f"train {out_dir.name}", disable=not progress, mininterval=1.0)
    started = time.perf_counter()
    for step in bar:
        batch = to_device(next(batches), device)
        with torch.autocast(device.type, enabled=amp):
            inputs = task.model_inputs(batch)
            if distiller is not None:
                out = distiller(*inputs)
                prediction, teacher_prediction = out.student_output, out.teacher_output
                terms = {k: v for k, v in out.losses.items() if k != "total"}
            else:
                prediction, teacher_prediction, terms = model(*inputs), None, {}
                if teacher is not None:  # a teacher for the task losses alone (Hinton)
                    with torch.no_grad():
                        teacher_prediction = teacher(*inputs)
            terms = {**task.losses(prediction, batch, teacher_prediction, run.loss), **terms}
            if run.sparsity:
                terms["bn_l1"] = bn_l1_penalty(model, run.sparsity)
        total = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        if settings.grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(parameters, settings.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        done = step + 1
        if done % settings.log_every == 0 or done == settings.steps:
            record = {"step": done, "total": total.item(),
                      **{k: v.item() for k, v in terms.items()},
                      "lr": schedule.get_last_lr()[0],
                      "ms_per_step": 1e3 * (time.perf_counter() - started) / settings.log_every}
            started = time.perf_counter()
            _log(log_path, {"kind": "train", **record})
            bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k != "step"},
                            refresh=False)
        if settings.checkpoint_every and done % settings.checkpoint_every == 0:
            checkpoint(done)
        if settings.eval_every and done % settings.eval_every == 0 and done < settings.steps:
            metrics = evaluate(task, model, eval_set, run, device, progress)
            _log(log_path, {"kind": "eval", "step": done, **metrics})
            tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    checkpoint(settings.steps)
    save_atomic({"model": model.state_dict()}, out_dir / WEIGHTS)
    metrics = evaluate(task, model, eval_set, run, device, progress)
    _log(log_path, {"kind": "eval", "step": settings.steps, **metrics})
    if progress:
        print(f"{out_dir}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics

