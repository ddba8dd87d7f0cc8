"""The comparison report: a table with seed statistics and paired bootstrap intervals, a
CSV, and figures (metric bars with intervals, training curves, example predictions).

The report is built in two steps: :func:`build_report` turns the evaluated models into a
:class:`CompareReport` (numbers only), and the renderers write it: :func:`render_markdown`,
:func:`write_csv` and the figures (:mod:`kdkit.report_figures`).

Statistics. For each method, each seed's metric is the mean over test images; the table
gives the mean ± standard deviation of that over seeds (with one seed, the mean and
``n = 1``). Against the baseline, each test image's difference (method − baseline, same
seed, averaged over seeds) is resampled with replacement 10,000 times; the 2.5th and 97.5th
percentiles of the resampled means are the 95% interval. An interval that excludes 0 is a
difference the test set resolves; one that straddles 0 is not (at this test-set size and
these seeds).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdkit.config import from_mapping
from kdkit.errors import ConfigError, DataError
from kdkit.evaluation_cache import is_training_free
from kdkit.export import cpu_latency_ms
from kdkit.provenance import provenance, provenance_line
from kdkit.pruning import count_parameters_and_flops
from kdkit.train import build_model, read_log

__all__ = ["CompareReport", "MethodRow", "ModelCost", "ModelResult", "ReportSettings", "SeedRow",
           "Stat", "bootstrap_interval", "build_report", "check_metric_names", "column_digits",
           "method_label", "metric_header", "render_markdown", "render_table",
           "report_settings", "training_curves", "unpruned_spec", "verdicts",
           "write_compare_report", "write_csv"]

BOOTSTRAP_SAMPLES = 10_000
# significant digits of a column's largest value: metrics, then costs and intervals
METRIC_DIGITS, OTHER_DIGITS = 4, 3


@dataclass
class ModelResult:
    """One model's per-image test metrics and where its run lives; a training-free method
    (``model_spec`` ``{training_free: name}``: no run, no weights) has its median CPU
    seconds per image instead."""

    name: str
    seed: int
    model_spec: dict[str, Any]
    per_image: list[dict[str, float]]
    run_dir: Path | None
    teacher: bool = False
    seconds_per_image: float | None = None

    @property
    def training_free(self) -> bool:
        return is_training_free(self.model_spec)

    def mean(self, metric: str) -> float:
        return statistics.fmean(image[metric] for image in self.per_image)


@dataclass
class ReportSettings:
    """A compare config's ``report:`` mapping; ``primary``/``better`` default to the task's
    ``primary_metric``, ``columns`` to every metric, ``examples: 0`` draws no examples."""

    primary: str | None = None
    better: str | None = None
    examples: int = 4
    flops_size: list[int] = field(default_factory=lambda: [320, 320])
    latency_size: list[int] | None = field(default_factory=lambda: [512, 512])
    columns: list[str] | None = None
    smoke_scale: bool = False
    title: str = "Knowledge distillation comparison"
    command: str | None = None


def _check_size(value: list[int] | None, key: str) -> None:
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ConfigError(f"report.{key}: expected [height, width], two positive integers, "
                          f"found {value}")


def report_settings(mapping: dict[str, Any], task: Any = None) -> ReportSettings:
    """Checked :class:`ReportSettings` from a ``report:`` mapping (keys, types, ranges);
    with ``task``, ``primary`` and ``better`` filled in from its ``primary_metric``."""
    settings = from_mapping(ReportSettings, mapping, "report")
    if settings.better not in (None, "lower", "higher"):
        raise ConfigError(f"report.better: expected 'lower' or 'higher', found "
                          f"{settings.better!r}")
    if settings.examples < 0:
        raise ConfigError(f"report.examples: expected a count ≥ 0 (0: no examples figure), "
                          f"found {settings.examples}")
    _check_size(settings.flops_size, "flops_size")
    _check_size(settings.latency_size, "latency_size")
    if task is not None:
        primary, better = getattr(task, "primary_metric", (None, "lower"))
        settings.primary = settings.primary or primary
        settings.better = settings.better or better
    return settings


def check_metric_names(settings: ReportSettings, metric_names: list[str]) -> None:
    """Refuse a ``report.primary`` or ``report.columns`` that names no metric of the task."""
    asked = [settings.primary, *(settings.columns or [])]
    unknown = [name for name in asked if name is not None and name not in metric_names]
    if unknown:
        raise ConfigError(f"report names {unknown}, not metrics of this task; its metrics: "
                          f"{', '.join(metric_names)}")


@dataclass
class Stat:
    """Mean, standard deviation (0 for one value) and count of one metric over seeds."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), std, len(values))


@dataclass
class ModelCost:
    """An architecture's parameters, GFLOPs of one forward, CPU ms of one forward (None when
    not timed) and, for a pruned model, the percentage of the unpruned architecture's
    parameters and GFLOPs it kept. A training-free method has none of these, only
    ``image_s``: its median wall-clock CPU seconds per test image."""

    params: int | None
    gflops: float | None
    cpu_ms: float | None = None
    kept_params: float | None = None
    kept_gflops: float | None = None
    image_s: float | None = None

    @property
    def training_free(self) -> bool:
        return self.image_s is not None


@dataclass
class SeedRow:
    """One model and seed: a row of the CSV."""

    method: str
    seed: int
    metrics: dict[str, float]
    cost: ModelCost
    train_ms_per_step: float | None


@dataclass
class MethodRow:
    """One method over its seeds: a row of the table. ``delta`` is (mean, low, high) of
    method − baseline on the primary metric, None for the baseline."""

    method: str
    metrics: dict[str, Stat]
    cost: ModelCost
    train_ms_per_step: float | None
    delta: tuple[float, float, float] | None


@dataclass
class CompareReport:
    """Everything the report shows, before any rendering."""

    settings: ReportSettings
    task: str
    baseline: str
    metric_names: list[str]
    units: dict[str, str]
    images: int
    seeds: list[int]
    device: str
    steps: list[int]
    runtime: str
    threads: int
    provenance: dict[str, str]
    seed_rows: list[SeedRow]
    rows: list[MethodRow]
    notes: list[str] = field(default_factory=list)  # how the runs were trained (budget…)

    @property
    def intervals(self) -> dict[str, tuple[float, float, float]]:
        return {row.method: row.delta for row in self.rows if row.delta is not None}

    @property
    def training_free(self) -> bool:
        return any(row.cost.training_free for row in self.rows)

    @property
    def pruned(self) -> bool:
        return any(row.cost.kept_params is not None for row in self.rows)


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


def _ms_per_step(run_dir: Path | None) -> float | None:
    """Median training ms/step over the logged intervals, the first (start-up) left out."""
    times = [x["ms_per_step"] for x in read_log(run_dir, "train")]
    times = times[1:] if len(times) > 1 else times
    return statistics.median(times) if times else None


def unpruned_spec(spec: dict) -> dict | None:
    """The architecture a pruned model's ``spec`` was pruned from; None when not pruned."""
    if "pruned" not in spec:
        return None
    return {k: v for k, v in spec.items() if k not in ("pruned", "reinit")}


def _count(task, spec: dict, size: list[int]) -> tuple[int, float]:
    """(parameters, GFLOPs of one forward at ``size``) of the architecture ``spec``."""
    model = build_model(task, spec).eval()
    params, flops = count_parameters_and_flops(model, task.flops_inputs(*size))
    return params, flops / 1e9


def _model_cost(task, spec: dict, settings: ReportSettings) -> tuple[ModelCost, str]:
    """(the cost of the architecture of ``spec``, the runtime that timed it or ""); weights
    change none of it."""
    params, gflops = _count(task, spec, settings.flops_size)
    cost = ModelCost(params, gflops)
    if (unpruned := unpruned_spec(spec)) is not None:
        full_params, full_gflops = _count(task, unpruned, settings.flops_size)
        cost.kept_params = 100 * params / full_params
        cost.kept_gflops = 100 * gflops / full_gflops
    if settings.latency_size is None:
        return cost, ""
    model = build_model(task, spec).eval()
    cost.cpu_ms, runtime = cpu_latency_ms(model, task.flops_inputs(*settings.latency_size))
    return cost, runtime


def _costs(task, results: list[ModelResult],
           settings: ReportSettings) -> tuple[dict[str, ModelCost], str]:
    """({architecture key: cost} for every architecture among ``results``, the runtime);
    a training-free method's cost is its seconds per image."""
    costs, runtime = {}, ""
    for result in results:
        key = _spec_key(result.model_spec)
        if result.training_free:
            costs[key] = ModelCost(None, None, image_s=result.seconds_per_image)
        elif key not in costs:
            costs[key], runtime = _model_cost(task, result.model_spec, settings)
    return costs, runtime


def _spec_key(spec: dict) -> str:
    return json.dumps(spec, sort_keys=True)


def _paired(results: list[ModelResult], baseline: str, metric: str) -> dict[str, np.ndarray]:
    """Per-image (method − baseline) differences, averaged over the seeds both share; the
    teacher (one model) is paired with every seed's baseline. Raises DataError when a
    method and the baseline were evaluated on different numbers of images."""
    base = {r.seed: r for r in results if r.name == baseline}
    by_method: dict[str, list[np.ndarray]] = {}
    pairs = [(r, base[seed]) for r in results if r.name != baseline
             for seed in (base if r.teacher else [r.seed]) if seed in base]
    for r, other in pairs:
        if len(r.per_image) != len(other.per_image):
            raise DataError(
                f"cannot pair {r.name!r} (seed {r.seed}, {len(r.per_image)} test images) with "
                f"the baseline {baseline!r} ({len(other.per_image)} images): they were "
                "evaluated on different test sets. Delete their per_image.json files and "
                "run the comparison again")
        diff = np.array([a[metric] - b[metric] for a, b in zip(r.per_image, other.per_image)])
        by_method.setdefault(r.name, []).append(diff)
    return {name: np.mean(diffs, axis=0) for name, diffs in by_method.items()}


def _method_row(name: str, group: list[ModelResult], metric_names: list[str],
                cost: ModelCost, delta) -> MethodRow:
    """A method's row; a training-free method's metrics are one result (every seed's are
    the same), so n = 1."""
    group_stats = group[:1] if group[0].training_free else group
    stats = {m: Stat.of([r.mean(m) for r in group_stats]) for m in metric_names}
    times = [t for t in map(_ms_per_step, (r.run_dir for r in group)) if t is not None]
    return MethodRow(name, stats, cost, statistics.median(times) if times else None, delta)


def _steps(results: list[ModelResult]) -> list[int]:
    """The distinct final training steps of the students."""
    return sorted({records[-1]["step"] for r in results
                   if not r.teacher and (records := read_log(r.run_dir, "train"))})


def build_report(config, task, results: list[ModelResult], settings: ReportSettings,
                 images: int, device, notes: list[str] | None = None) -> CompareReport:
    """The report's numbers: per-seed rows, per-method rows with seed statistics, costs and
    the paired interval against ``config.baseline`` on the primary metric (the first
    metric when neither the task nor ``report.primary`` names one)."""
    metric_names = settings.columns or list(results[0].per_image[0])
    check_metric_names(settings, list(results[0].per_image[0]))
    settings = replace(settings, primary=settings.primary or metric_names[0])
    costs, runtime = _costs(task, results, settings)
    cost_of = {id(r): costs[_spec_key(r.model_spec)] for r in results}
    paired = _paired(results, config.baseline, settings.primary)
    intervals = {name: (float(d.mean()), *bootstrap_interval(d)) for name, d in paired.items()}
    seed_rows = [SeedRow(r.name, r.seed, {m: r.mean(m) for m in metric_names}, cost_of[id(r)],
                         _ms_per_step(r.run_dir)) for r in results]
    rows = []
    for name in dict.fromkeys(r.name for r in results):
        group = [r for r in results if r.name == name]
        rows.append(_method_row(name, group, metric_names, cost_of[id(group[0])],
                                intervals.get(name)))
    units = getattr(task, "metric_units", {})
    return CompareReport(settings, config.task, config.baseline, metric_names,
                         {m: units[m] for m in metric_names if m in units}, images,
                         list(config.seeds), str(device), _steps(results), runtime,
                         torch.get_num_threads(), provenance(), seed_rows, rows,
                         list(notes or []))


# --- rendering: numbers -----------------------------------------------------------------------


def column_digits(values: list[float | None], significant: int) -> int:
    """Decimals that give the column's largest magnitude ``significant`` digits (at least
    0): one number format for a whole column."""
    largest = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0)
    if largest == 0:
        return significant - 1
    return max(0, significant - 1 - math.floor(math.log10(largest)))


def _number(value: float | None, digits: int, sign: str = "") -> str:
    return "—" if value is None else f"{value:{sign},.{digits}f}"


def _stat_cell(stat: Stat, digits: int) -> str:
    if stat.n == 1:
        return f"{_number(stat.mean, digits)} (n = 1)"
    return f"{_number(stat.mean, digits)} ± {_number(stat.std, digits)}"


def _delta_cell(delta: tuple[float, float, float] | None, digits: int) -> str:
    if delta is None:
        return "—"
    mean, low, high = (_number(v, digits, "+") for v in delta)
    return f"{mean} [{low}, {high}]"


def _metric_column(report: CompareReport, metric: str) -> list[str]:
    stats = [row.metrics[metric] for row in report.rows]
    digits = column_digits([s.mean for s in stats], METRIC_DIGITS)
    return [_stat_cell(s, digits) for s in stats]


def _cost_column(values: list[float | None]) -> list[str]:
    digits = column_digits(values, OTHER_DIGITS)
    return [_number(v, digits) for v in values]


def _delta_column(report: CompareReport) -> list[str]:
    deltas = [row.delta for row in report.rows]
    digits = column_digits([v for d in deltas if d for v in d], OTHER_DIGITS)
    return [_delta_cell(d, digits) for d in deltas]


def method_label(row: MethodRow) -> str:
    return f"{row.method} (training-free)" if row.cost.training_free else row.method


def metric_header(report: CompareReport, metric: str) -> str:
    unit = report.units.get(metric)
    return f"{metric} ({unit})" if unit else metric


def _columns(report: CompareReport) -> list[tuple[str, list[str]]]:
    """The table as (header, cells) columns, each cell in its column's format."""
    s, rows = report.settings, report.rows
    columns = [("method", [method_label(row) for row in rows])]
    columns += [(metric_header(report, m), _metric_column(report, m))
                for m in report.metric_names]
    columns.append(("params", [_number(row.cost.params, 0) for row in rows]))
    columns.append((f"GFLOPs @{s.flops_size[0]}²",
                    _cost_column([row.cost.gflops for row in rows])))
    if report.pruned:
        columns.append(("kept % params", _cost_column([r.cost.kept_params for r in rows])))
        columns.append(("kept % GFLOPs", _cost_column([r.cost.kept_gflops for r in rows])))
    if s.latency_size:
        columns.append((f"CPU ms @{s.latency_size[0]}²",
                        _cost_column([row.cost.cpu_ms for row in rows])))
    columns.append(("train ms/step", _cost_column([row.train_ms_per_step for row in rows])))
    if report.training_free:
        columns.append(("training-free CPU s/image",
                        _cost_column([row.cost.image_s for row in rows])))
    columns.append((f"Δ{s.primary} vs {report.baseline} [95% CI]", _delta_column(report)))
    return columns


def render_table(report: CompareReport) -> list[str]:
    """The Markdown table's lines."""
    columns = _columns(report)
    lines = ["| " + " | ".join(header for header, _ in columns) + " |",
             "|---|" + "---:|" * (len(columns) - 2) + "---|"]
    for cells in zip(*(cells for _, cells in columns)):
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- rendering: text --------------------------------------------------------------------------


def _preamble(report: CompareReport) -> list[str]:
    s = report.settings
    text = [f"# {s.title}", ""]
    if s.smoke_scale:
        text += ["**Smoke-scale run.** Tiny models, tiny images and few steps on a CPU: it",
                 "checks that every method trains and is evaluated the same way, and shows",
                 "what this test set can resolve. It is not evidence about the methods at",
                 "the papers' scale.", ""]
    if s.command:
        text += [f"Made by `{s.command}`.", ""]
    return text + [f"Ran with {provenance_line(report.provenance)}", ""]


def _method_text(report: CompareReport) -> str:
    s = report.settings
    text = (
        f"Task `{report.task}`; {report.images} test images; seeds {report.seeds}; device "
        f"{report.device}; training steps per student {report.steps or '—'}. Metrics are "
        f"means over test images, then mean ± std over seeds (n = 1: one seed, no spread). "
        f"Δ{s.primary}: the per-image difference to `{report.baseline}` (same seed, averaged "
        f"over seeds; the teacher, one model, against every seed's) with a 95% percentile "
        f"bootstrap interval over test images ({BOOTSTRAP_SAMPLES:,} resamples).")
    if report.pruned:
        text += (" Kept %: a pruned model's parameters and GFLOPs as a percentage of the "
                 "unpruned architecture it was pruned from.")
    if s.latency_size:
        text += (f" CPU ms: median of one forward pass of one {s.latency_size[0]}×"
                 f"{s.latency_size[1]} input on this machine's CPU ({report.runtime}, "
                 f"{report.threads} threads).")
    if report.training_free:
        text += (" Training-free rows are the task's classical methods, never trained: the "
                 "same per-image metrics for every seed, each seed's paired with that seed's "
                 "baseline; they have no parameters, GFLOPs or steps. Their CPU s/image is "
                 "the median wall-clock time of the method on one test image at the test "
                 "set's own size on this machine, measured when their metrics were computed "
                 "(not the networks' CPU ms, a latency at the size above).")
    return text


def _verdict_text(report: CompareReport) -> list[str]:
    s = report.settings
    improved, worsened, unresolved = verdicts(report.intervals, s.better)
    return [
        f"- Better {s.primary} than `{report.baseline}` ({s.better} is better), interval "
        f"excluding 0: {', '.join(improved) or 'none'}.",
        f"- Worse {s.primary} than `{report.baseline}`, interval excluding 0: "
        f"{', '.join(worsened) or 'none'}.",
        f"- Not resolved by this test set (interval contains 0): "
        f"{', '.join(unresolved) or 'none'}.",
    ]


def _figure_links(report: CompareReport) -> list[str]:
    links = ["![metric bars and intervals](metrics.png)",
             "![training curves: task loss and each run's total](curves.png)"]
    if report.settings.examples:
        links.append("![examples](examples.png)")
    return [line for link in links for line in ("", link)]


def render_markdown(report: CompareReport) -> str:
    """results.md: title, provenance, method, table, verdicts, figure links."""
    notes = [line for note in report.notes for line in (note, "")]
    text = [*_preamble(report), _method_text(report), "", *notes, *render_table(report), "",
            *_verdict_text(report), *_figure_links(report), ""]
    return "\n".join(text)


def write_csv(report: CompareReport, path: Path) -> None:
    """results.csv: one row per model and seed, raw numbers."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "seed", "training_free", *report.metric_names, "params",
                         "gflops", "kept_params_pct", "kept_gflops_pct", "cpu_ms",
                         "train_ms_per_step", "cpu_s_per_image"])
        for row in report.seed_rows:
            cost = row.cost
            optional = (cost.kept_params, cost.kept_gflops, cost.cpu_ms, row.train_ms_per_step)
            writer.writerow([row.method, row.seed, "yes" if cost.training_free else "",
                             *(f"{row.metrics[m]:.6g}" for m in report.metric_names),
                             "" if cost.params is None else cost.params,
                             "" if cost.gflops is None else f"{cost.gflops:.3f}",
                             *("" if v is None else f"{v:.1f}" for v in optional),
                             "" if cost.image_s is None else f"{cost.image_s:.4g}"])


# --- figures: kdkit/report_figures.py; the curves' numbers ---------------------------------


CURVES = {"task_loss": "task loss (the task's own terms, unweighted: comparable)",
          "total": "total loss (the run's own terms)"}


def training_curves(results: list[ModelResult]) -> dict[str, dict[str, list[tuple]]]:
    """``{log key: {method: [(step, value), ...]}}`` for each key of :data:`CURVES`, from
    each student method's first seed that logged the key; a method whose logs lack it has
    no curve for it (logs older than ``task_loss`` have only their total)."""
    curves: dict[str, dict[str, list[tuple]]] = {key: {} for key in CURVES}
    for r in sorted((r for r in results if not r.teacher), key=lambda r: r.seed):
        records = read_log(r.run_dir, "train")
        for key, by_method in curves.items():
            points = [(x["step"], x[key]) for x in records if key in x]
            if points and r.name not in by_method:
                by_method[r.name] = points
    return curves


def write_compare_report(config, task, results: list[ModelResult], teacher_weights: str,
                         eval_set, device, notes: list[str] | None = None) -> Path:
    """Write results.csv, results.md (with ``notes``: lines on how the runs were trained,
    such as a budget's plan), metrics.png, curves.png and (unless ``report.examples: 0``)
    examples.png into ``<out_dir>/report`` and print the table; when the base run logs to
    TensorBoard (``train.log``), the figures go there too
    (:func:`kdkit.report_figures.figures_to_tensorboard`). Returns the folder."""
    from kdkit import report_figures as figures  # it draws this module's numbers

    settings = report_settings(config.report, task)
    report = build_report(config, task, results, settings, len(eval_set), device, notes)
    out = Path(config.out_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(report, out / "results.csv")
    (out / "results.md").write_text(render_markdown(report))
    figures.figure_bars(out / "metrics.png", report)
    figures.figure_curves(out / "curves.png", results)
    if settings.examples:
        shown = figures.shown_predictions(report, results, task, teacher_weights, device)
        figures.figure_examples(out / "examples.png", task, shown, eval_set, device,
                                settings.examples)
    if "tensorboard" in (config.base.get("train") or {}).get("log", ()):
        figures.figures_to_tensorboard(out)
    print("\n".join(render_table(report)))
    print(f"\nreport: {out / 'results.md'}")
    return out
