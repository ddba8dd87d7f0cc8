"""The comparison report: a table with seed statistics and paired bootstrap intervals, a
CSV, and figures (metric bars with intervals, training curves, example predictions).

Statistics. For each method, each seed's metric is the mean over test images; the table
gives the mean ± standard deviation of that over seeds. Against the baseline, each test
image's difference (method − baseline, same seed, averaged over seeds) is resampled with
replacement 10,000 times; the 2.5th and 97.5th percentiles of the resampled means are the
95% interval. An interval that excludes 0 is a difference the test set resolves; one that
straddles 0 is not (at this test-set size and these seeds).
"""

from __future__ import annotations

import csv
import itertools
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from kdkit.checkpoint import load_weights  # noqa: E402
from kdkit.export import cpu_latency_ms  # noqa: E402
from kdkit.train import build_model, read_log, test_batches  # noqa: E402

__all__ = ["ModelResult", "bootstrap_interval", "verdicts", "write_compare_report"]

BOOTSTRAP_SAMPLES = 10_000


@dataclass
class ModelResult:
    """One trained model's per-image test metrics and where its run lives."""

    name: str
    seed: int
    model_spec: dict[str, Any]
    per_image: list[dict[str, float]]
    run_dir: Path | None
    teacher: bool = False

    def mean(self, metric: str) -> float:
        return statistics.fmean(image[metric] for image in self.per_image)


def bootstrap_interval(differences: np.ndarray, level: float = 0.95,
                       samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``differences`` (one value per item)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(differences), size=(samples, len(differences)))
    means = differences[picks].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def verdicts(intervals: dict[str, tuple[float, float, float]],
             better: str) -> tuple[list[str], list[str], list[str]]:
    """(improved, worsened, unresolved) method names from ``{name: (mean, low, high)}``
    intervals of (method − baseline), for a metric where ``better`` is "lower" or
    "higher"; a difference counts only when its interval excludes 0."""
    lower = [n for n, (_, lo, hi) in intervals.items() if hi < 0]
    higher = [n for n, (_, lo, hi) in intervals.items() if lo > 0]
    unresolved = [n for n, (_, lo, hi) in intervals.items() if lo <= 0 <= hi]
    return (lower, higher, unresolved) if better == "lower" else (higher, lower, unresolved)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _ms_per_step(run_dir: Path | None) -> float | None:
    """Median training ms/step over the logged intervals, the first (start-up) left out."""
    times = [x["ms_per_step"] for x in read_log(run_dir, "train")]
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else None


def _model_cost(task, spec: dict, size: tuple[int, int],
                latency_size: tuple[int, int] | None) -> tuple[int, float, float | None, str]:
    """(parameters, GFLOPs of one forward at ``size``, CPU ms of one forward at
    ``latency_size`` or None, the runtime that timed it), for the architecture of
    ``spec`` (weights do not change either)."""
    model = build_model(task, spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*task.flops_inputs(*size))
    params = sum(p.numel() for p in model.parameters())
    latency, runtime = (None, "") if latency_size is None else cpu_latency_ms(
        model, task.flops_inputs(*latency_size))
    return params, counter.get_total_flops() / 1e9, latency, runtime


def _paired(results: list[ModelResult], baseline: str, metric: str) -> dict[str, np.ndarray]:
    """Per-image (method − baseline) differences, averaged over the seeds both share."""
    base = {r.seed: r for r in results if r.name == baseline}
    by_method: dict[str, list[np.ndarray]] = {}
    for r in results:
        if r.teacher or r.name == baseline or r.seed not in base:
            continue
        diff = np.array([a[metric] - b[metric]
                         for a, b in zip(r.per_image, base[r.seed].per_image)])
        by_method.setdefault(r.name, []).append(diff)
    return {name: np.mean(diffs, axis=0) for name, diffs in by_method.items()}


def _fmt(mean: float, std: float, scale: float = 1.0) -> str:
    digits = 4 if abs(mean * scale) < 1 else 2
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def _figure_bars(path: Path, names, means, intervals, metric, baseline, better) -> None:
    improved, worsened, _ = verdicts(intervals, better)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2))
    y = np.arange(len(names))
    left.barh(y, means, color="#4878a8")
    left.set_yticks(y, names)
    left.invert_yaxis()
    left.set_xlabel(f"mean {metric} ({better} is better)")
    rows = [(i, n) for i, n in enumerate(names) if n in intervals]
    for i, name in rows:
        mean, lo, hi = intervals[name]
        colour = "#2a7d2a" if name in improved else "#b23030" if name in worsened else "#777777"
        right.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", color=colour,
                       capsize=4)
    right.axvline(0, color="black", linewidth=0.8)
    right.set_yticks(y, names)
    right.set_ylim(left.get_ylim())
    right.set_xlabel(f"{metric} − {baseline}, per image, 95% bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _figure_curves(path: Path, results: list[ModelResult]) -> None:
    fig, ax = plt.subplots(figsize=(9, 5))
    for r in results:
        records = read_log(r.run_dir, "train")
        if records and (r.seed == min(x.seed for x in results if x.name == r.name)):
            ax.plot([x["step"] for x in records], [x["total"] for x in records],
                    label=r.name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (total of the run's own terms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _figure_examples(path: Path, task, shown: dict[str, tuple[dict, str]], eval_set,
                     device, count: int) -> None:
    """A grid: one row per test image, the task's panels (input, truth, each model)."""
    models = {label: load_weights(build_model(task, spec), weights).to(device).eval()
              for label, (spec, weights) in shown.items()}
    rows = []
    for batch in itertools.islice(test_batches(eval_set, device), count):
        predictions = {label: m(*task.model_inputs(batch)) for label, m in models.items()}
        rows.append(task.example_panels(batch, predictions))
    columns = len(rows[0])
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.2 * columns, 2.2 * len(rows)),
                             squeeze=False)
    for r, panels in enumerate(rows):
        for c, (title, picture) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(picture, cmap="gray", vmin=0, vmax=1 if picture.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_compare_report(config, task, results: list[ModelResult], teacher_weights: str,
                         eval_set, device) -> Path:
    """Write results.csv, results.md, metrics.png, curves.png and examples.png into
    ``<out_dir>/report`` and print the table; returns the folder."""
    primary, direction = getattr(task, "primary_metric", (None, "lower"))
    settings = {"primary": primary, "better": direction, "examples": 4,
                "flops_size": [320, 320], "latency_size": [512, 512], "columns": None,
                "smoke_scale": False,
                "title": "Knowledge distillation comparison", "command": None, **config.report}
    metric_names = settings["columns"] or list(results[0].per_image[0])
    metric, better = settings["primary"] or metric_names[0], settings["better"]
    if metric not in results[0].per_image[0]:
        raise ValueError(f"report.primary {metric!r} is not a metric of this task; its "
                         f"metrics: {', '.join(results[0].per_image[0])}")
    if better not in ("lower", "higher"):
        raise ValueError(f"report.better must be 'lower' or 'higher', got {better!r}")
    out = Path(config.out_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(r.name for r in results))
    costs = {}
    for r in results:
        key = json.dumps(r.model_spec, sort_keys=True)
        if key not in costs:
            latency_size = settings["latency_size"]
            costs[key] = _model_cost(task, r.model_spec, tuple(settings["flops_size"]),
                                     tuple(latency_size) if latency_size else None)
    runtime = next(iter(costs.values()))[3]

    with open(out / "results.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", *metric_names, "params", "gflops",
                         "cpu_ms", "train_ms_per_step"])
        for r in results:
            ms = _ms_per_step(r.run_dir)
            params, gflops, latency, _ = costs[json.dumps(r.model_spec, sort_keys=True)]
            writer.writerow([r.name, r.seed, *(f"{r.mean(m):.6g}" for m in metric_names),
                             params, f"{gflops:.3f}", "" if latency is None else f"{latency:.1f}",
                             "" if ms is None else f"{ms:.1f}"])

    paired = _paired(results, config.baseline, metric)
    intervals = {name: (float(d.mean()), *bootstrap_interval(d)) for name, d in paired.items()}
    latency_size = settings["latency_size"]
    header = ["method", *metric_names, "params", f"GFLOPs @{settings['flops_size'][0]}²",
              *([f"CPU ms @{latency_size[0]}²"] if latency_size else []),
              "train ms/step", f"Δ{metric} vs {config.baseline} [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    means = []
    for name in names:
        group = [r for r in results if r.name == name]
        cells = [_fmt(*_mean_std([r.mean(m) for r in group])) for m in metric_names]
        params, gflops, latency, _ = costs[json.dumps(group[0].model_spec, sort_keys=True)]
        ms = [t for t in (_ms_per_step(r.run_dir) for r in group) if t is not None]
        interval = intervals.get(name)
        delta = (f"{interval[0]:+.4g} [{interval[1]:+.4g}, {interval[2]:+.4g}]"
                 if interval else "—")
        lines.append("| " + " | ".join([name, *cells, f"{params:,}", f"{gflops:.2f}",
                                        *([f"{latency:.0f}"] if latency_size else []),
                                        f"{statistics.median(ms):.0f}" if ms else "—",
                                        delta]) + " |")
        means.append(statistics.fmean(r.mean(metric) for r in group))
    improved, worsened, unresolved = verdicts(intervals, better)
    steps = {r.name: records[-1]["step"] for r in results
             if (records := read_log(r.run_dir, "train"))}
    text = [f"# {settings['title']}", ""]
    if settings["smoke_scale"]:
        text += ["**Smoke-scale run.** Tiny models, tiny images and few steps on a CPU: it",
                 "checks that every method trains and is evaluated the same way, and shows",
                 "what this test set can resolve. It is not evidence about the methods at",
                 "the papers' scale.", ""]
    if settings["command"]:
        text += [f"Made by `{settings['command']}`.", ""]
    text += [
        f"Task `{config.task}`; {len(eval_set)} test images; seeds {config.seeds}; "
        f"device {device}; training steps per student "
        f"{sorted(set(v for k, v in steps.items() if k != 'teacher')) or '—'}.",
        f"Metrics are means over test images, then mean ± std over seeds. Δ{metric}: the "
        f"per-image difference to `{config.baseline}` (same seed, averaged over seeds) with "
        f"a 95% percentile bootstrap interval over test images ({BOOTSTRAP_SAMPLES:,} "
        "resamples)."
        + (f" CPU ms: median of one forward pass of one {latency_size[0]}×{latency_size[1]} "
           f"input on this machine's CPU ({runtime}, {torch.get_num_threads()} threads)."
           if latency_size else ""),
        "",
        *lines,
        "",
        f"- Better {metric} than `{config.baseline}` ({better} is better), interval "
        f"excluding 0: {', '.join(improved) or 'none'}.",
        f"- Worse {metric} than `{config.baseline}`, interval excluding 0: "
        f"{', '.join(worsened) or 'none'}.",
        f"- Not resolved by this test set (interval contains 0): "
        f"{', '.join(unresolved) or 'none'}.",
        "",
        "![metric bars and intervals](metrics.png)",
        "",
        "![training curves](curves.png)",
        "",
        "![examples](examples.png)",
        "",
    ]
    (out / "results.md").write_text("\n".join(text))
    _figure_bars(out / "metrics.png", names, means, intervals, metric, config.baseline, better)
    _figure_curves(out / "curves.png", [r for r in results if not r.teacher])
    students = [n for n in names if n not in ("teacher", config.baseline)]
    pick = min if better == "lower" else max
    best = pick(students, key=lambda n: means[names.index(n)]) if students else None
    teacher = next(r for r in results if r.teacher)
    shown = {"teacher": (teacher.model_spec, teacher_weights)}
    for label, name in ((config.baseline, config.baseline), (f"{best} (best)", best)):
        if name:
            result = next(r for r in results if r.name == name)
            shown[label] = (result.model_spec, str(result.run_dir / "model.pt"))
    _figure_examples(out / "examples.png", task, shown, eval_set, device,
                     settings["examples"])
    print("\n".join(lines))
    print(f"\nreport: {out / 'results.md'}")
    return out

