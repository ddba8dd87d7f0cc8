"""Per-image test metrics of the comparison's rows, cached under a key of everything that
produced them: a trained model's (its weights' bytes, architecture, ``data:``, ``metrics:``)
or a task's training-free method's (its name and version, ``data:``, ``metrics:``).

Every row goes through :func:`per_image_metrics`: one test image at a time (a batch of
one, as :func:`kdkit.train.test_batches` yields it), a fresh metric per image.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdkit.checkpoint import load_weights, resolve_path
from kdkit.errors import ConfigError
from kdkit.task import Task
from kdkit.train import build_model, metric_values, test_batches

__all__ = ["METRICS_VERSION", "TRAINING_FREE", "evaluate_cached", "evaluate_training_free",
           "evaluation_key", "file_digest", "is_training_free", "model_predictor",
           "per_image_metrics", "training_free_method", "training_free_methods"]

# Bump when kdkit's per-image evaluation changes (a task bumps its own ``metrics_version``):
# it is part of every cached evaluation's key, so the caches are recomputed.
METRICS_VERSION = 1

Predict = Callable[[Any], Any]  # a batch of one test image → a prediction the metrics take

#: A method or result spec ``{training_free: <name>}`` names one of the task's
#: training-free methods (:meth:`kdkit.task.Task.training_free`).
TRAINING_FREE = "training_free"


def is_training_free(spec: dict | None) -> bool:
    """Whether a method's (or a result's model) spec names a training-free method."""
    return TRAINING_FREE in (spec or {})


def model_predictor(task: Task, spec: dict, weights: str | Path, device) -> Predict:
    """A batch → the prediction of the model ``spec`` loaded with ``weights``, in eval mode
    on ``device``."""
    model = load_weights(build_model(task, spec), weights).to(device).eval()
    return lambda batch: model(*task.model_inputs(batch))


@torch.no_grad()
def per_image_metrics(task: Task, predict: Predict, dataset, run, device) -> list[dict]:
    """Each test image's metrics (a fresh metric per image), in dataset order; ``predict``
    maps a batch of one image (on ``device``) to the prediction."""
    values = []
    for batch in test_batches(dataset, device, run.train.num_workers):
        metrics = task.metrics(run.metrics).to(device)
        task.update_metrics(metrics, predict(batch), batch)
        values.append(metric_values(metrics))
    return values


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (a weights file: small enough to hash whole)."""
    digest = hashlib.sha256()
    with open(resolve_path(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key(task: Task, made_of: dict, data: dict, metrics: dict) -> dict[str, Any]:
    """A cache key: ``made_of`` (what predicts), the evaluation's ``data:`` and ``metrics:``
    mappings and the metric versions of kdkit and of the task (``metrics_version``, 1
    when absent), as JSON would store it."""
    return json.loads(json.dumps({
        **made_of, "data": data, "metrics": metrics,
        "metrics_version": {"kdkit": METRICS_VERSION,
                            "task": getattr(task, "metrics_version", 1)},
    }, sort_keys=True, default=str))


def evaluation_key(task: Task, model_spec: dict, weights: str | Path, data: dict,
                   metrics: dict) -> dict[str, Any]:
    """Everything that produced a model's per-image metrics: the weights' bytes, the
    architecture, the evaluation's ``data:`` and ``metrics:`` mappings, and the metric
    versions of kdkit and of the task (``task.metrics_version``, 1 when absent)."""
    return _key(task, {"weights": file_digest(weights), "model": model_spec}, data, metrics)


def _cached(cache: Path, key: dict) -> dict | None:
    """The stored record of ``cache`` when it was made under ``key``, else None."""
    if not cache.exists():
        return None
    stored = json.loads(cache.read_text())
    return stored if isinstance(stored, dict) and stored.get("key") == key else None


def evaluate_cached(task: Task, model_spec: dict, weights: str | Path, run, data: dict,
                    device, eval_set, cache: Path) -> list[dict[str, float]]:
    """Per-image metrics of the model ``model_spec`` with ``weights`` on ``eval_set`` (made
    from ``data``), read from ``cache`` when it holds them under the same
    :func:`evaluation_key`, else computed and written there with the key."""
    key = evaluation_key(task, model_spec, weights, data, run.metrics)
    if (stored := _cached(cache, key)) is not None:
        return stored["per_image"]
    values = per_image_metrics(task, model_predictor(task, model_spec, weights, device),
                               eval_set, run, device)
    cache.write_text(json.dumps({"key": key, "per_image": values}))
    return values


def training_free_methods(task: Task) -> dict[str, Predict]:
    """The task's training-free methods by name (:meth:`Task.training_free`; none when the
    task does not define it)."""
    method = getattr(task, "training_free", None)
    return {} if method is None else method()


def training_free_method(task: Task, name: str, where: str) -> Predict:
    """The task's training-free method ``name``; an unknown one is a ConfigError (naming
    ``where`` it was asked for) that lists the task's methods."""
    methods = training_free_methods(task)
    if name not in methods:
        raise ConfigError(f"{where}: the task has no training-free method {name!r}; its "
                          f"training-free methods: {', '.join(methods) or 'none'}")
    return methods[name]


def _timed(predict: Predict, seconds: list[float]) -> Predict:
    """``predict`` that appends each call's wall-clock seconds to ``seconds``."""
    def run(batch):
        start = time.perf_counter()
        prediction = predict(batch)
        seconds.append(time.perf_counter() - start)
        return prediction
    return run


def evaluate_training_free(task: Task, name: str, run, data: dict, device, eval_set,
                           cache: Path) -> tuple[list[dict[str, float]], float]:
    """(per-image metrics, median wall-clock seconds per image) of the task's training-free
    method ``name`` on ``eval_set`` (made from ``data``), read from ``cache`` when it holds
    them under the same key (the method's name and ``version`` attribute, ``data:``,
    ``metrics:``, the metric versions), else computed, timed and written there."""
    predict = training_free_method(task, name, "methods")
    made_of = {TRAINING_FREE: name, "version": getattr(predict, "version", None)}
    key = _key(task, made_of, data, run.metrics)
    if (stored := _cached(cache, key)) is not None:
        return stored["per_image"], stored["seconds_per_image"]
    seconds: list[float] = []
    values = per_image_metrics(task, _timed(predict, seconds), eval_set, run, device)
    median = statistics.median(seconds)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "per_image": values,
                                 "seconds_per_image": median, "seconds": seconds}))
    return values, median
