"""The comparison report's figures: metric bars with intervals (metrics.png), training
curves (curves.png), example predictions (examples.png), and the figures as TensorBoard
images. The numbers they draw come from :mod:`kdkit.report`."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from kdkit.evaluation_cache import (  # noqa: E402
    TRAINING_FREE,
    Predict,
    model_predictor,
    training_free_methods,
)
from kdkit.report import (  # noqa: E402
    CURVES,
    CompareReport,
    ModelResult,
    method_label,
    metric_header,
    training_curves,
    verdicts,
)
from kdkit.train import WEIGHTS, test_batches  # noqa: E402
from kdkit.training.runlog import tensorboard_writer  # noqa: E402

__all__ = ["figure_bars", "figure_curves", "figure_examples", "figures_to_tensorboard",
           "shown_predictions"]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_bars(path: Path, report: CompareReport) -> None:
    """metrics.png: the primary metric's mean per method (training-free ones grey and
    labelled so), and each method's interval."""
    s, intervals = report.settings, report.intervals
    names = [row.method for row in report.rows]
    labels = [method_label(row) for row in report.rows]
    improved, worsened, _ = verdicts(intervals, s.better)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 0.45 * len(names) + 2))
    y = np.arange(len(names))
    left.barh(y, [row.metrics[s.primary].mean for row in report.rows],
              color=["#a0a0a0" if row.cost.training_free else "#4878a8" for row in report.rows])
    left.set_yticks(y, labels)
    left.invert_yaxis()
    left.set_xlabel(f"mean {metric_header(report, s.primary)} ({s.better} is better)")
    for i, name in enumerate(names):
        if name in intervals:
            mean, lo, hi = intervals[name]
            colour = ("#2a7d2a" if name in improved else "#b23030" if name in worsened
                      else "#777777")
            right.errorbar(mean, i, xerr=[[mean - lo], [hi - mean]], fmt="o", color=colour,
                           capsize=4)
    right.axvline(0, color="black", linewidth=0.8)
    right.xaxis.set_major_locator(MaxNLocator(nbins=5))  # labels like −0.075 need room
    right.set_yticks(y, labels)
    right.set_ylim(left.get_ylim())
    right.set_xlabel(f"{s.primary} − {report.baseline}, per image, 95% bootstrap interval")
    _save(fig, path)


def line_style(index: int) -> dict:
    """The ``index``-th curve's colour and dash: matplotlib's ten colours, then the same
    ten dashed, then dotted, so up to 30 curves are told apart in the legend."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":")[index // 10 % 3]}


def figure_curves(path: Path, results: list[ModelResult]) -> None:
    """curves.png: the task loss of each method beside the run's own total."""
    curves = training_curves(results)
    fig, axes = plt.subplots(1, len(CURVES), figsize=(14, 5))
    for ax, (key, label) in zip(axes, CURVES.items()):
        for index, (name, points) in enumerate(curves[key].items()):
            ax.plot(*zip(*points), label=name, linewidth=1.2, **line_style(index))
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        if curves[key]:
            ax.set_yscale("log")
            ax.legend(fontsize=8, ncol=2)
        else:
            ax.text(0.5, 0.5, f"no {key} in these logs", ha="center", transform=ax.transAxes)
    _save(fig, path)


@torch.no_grad()
def figure_examples(path: Path, task, shown: dict[str, Predict], eval_set, device,
                    count: int) -> None:
    """examples.png: one row per test image (``count`` ≥ 1), the task's panels (input,
    truth, each prediction of ``shown``: label → a batch of one image → prediction)."""
    rows = []
    for batch in itertools.islice(test_batches(eval_set, device), count):
        predictions = {label: predict(batch) for label, predict in shown.items()}
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
    _save(fig, path)


def shown_predictions(report: CompareReport, results: list[ModelResult], task,
                      teacher_weights: str, device) -> dict[str, Predict]:
    """The examples' predictions: the teacher, the baseline, the best other trained student
    and every training-free method."""
    s, baseline = report.settings, report.baseline
    means = {row.method: row.metrics[s.primary].mean for row in report.rows
             if not row.cost.training_free}
    students = [n for n in means if n not in ("teacher", baseline)]
    pick = min if s.better == "lower" else max
    teacher = next(r for r in results if r.teacher)
    shown = {"teacher": model_predictor(task, teacher.model_spec, teacher_weights, device)}
    labels = [(baseline, baseline)]
    if students:
        best = pick(students, key=means.__getitem__)
        labels.append((f"{best} (best)", best))
    for label, name in labels:
        result = next(r for r in results if r.name == name)
        shown[label] = model_predictor(task, result.model_spec, result.run_dir / WEIGHTS, device)
    methods = training_free_methods(task)
    for name in dict.fromkeys(r.name for r in results if r.training_free):
        result = next(r for r in results if r.name == name)
        shown[name] = methods[result.model_spec[TRAINING_FREE]]
    return shown


def figures_to_tensorboard(out: Path) -> None:
    """The report's figures (``out/*.png``) as TensorBoard images ``report/<name>`` in
    ``out/tensorboard/`` (for comparisons whose runs log to TensorBoard too)."""
    with contextlib.closing(tensorboard_writer(out)) as writer:
        for png in sorted(out.glob("*.png")):
            picture = plt.imread(png)[..., :3]  # H×W×3 floats in [0, 1] (alpha dropped)
            writer.add_image(f"report/{png.stem}", picture, dataformats="HWC")
