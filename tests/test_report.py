"""The comparison report from hand-made results of the toy task: no training. Its numbers
(seed statistics, one format per column, units), its checks (settings, paired lengths), its
curves, its provenance line, and what ``report.examples: 0`` leaves out."""

import json
import re
import subprocess

import numpy as np
import pytest
from toy_task import ToyNet, ToyTask

from kdkit import provenance
from kdkit.checkpoint import save_atomic
from kdkit.compare import CompareConfig
from kdkit.errors import ConfigError, DataError
from kdkit.report import (
    ModelResult,
    _paired,
    build_report,
    column_digits,
    render_markdown,
    render_table,
    report_settings,
    training_curves,
    write_compare_report,
)
from kdkit.report_figures import line_style


class UnitTask(ToyTask):
    metric_units = {"mse": "pixel²"}


def _run(tmp_path, name, seed, records):
    run_dir = tmp_path / name / f"seed{seed}"
    run_dir.mkdir(parents=True)
    save_atomic({"model": ToyNet(4).state_dict()}, run_dir / "model.pt")
    (run_dir / "log.jsonl").write_text("".join(
        json.dumps({"kind": "train", "ms_per_step": 10.0, **r}) + "\n" for r in records))
    return run_dir


def _results(tmp_path, seeds=(0,), images=4, task_loss=True):
    """The teacher and two student methods; ``kd`` beats ``student`` on every image."""
    rng = np.random.default_rng(0)
    results = [ModelResult("teacher", 0, {"width": 4},
                           [{"mse": 0.3 + 0.01 * i} for i in range(images)], None, True)]
    for seed in seeds:
        base = rng.uniform(0.05, 0.2, size=images)
        for name, values in (("student", base), ("kd", base * 0.5)):
            extra = {"task_loss": 2.0} if task_loss else {}
            run_dir = _run(tmp_path, name, seed, [{"step": s, "total": 3.0, **extra}
                                                  for s in (2, 4)])
            results.append(ModelResult(name, seed, {"width": 4},
                                       [{"mse": float(v)} for v in values], run_dir))
    return results


def _config(tmp_path, seeds=(0,), **report):
    settings = {"latency_size": None, "flops_size": [8, 8], "examples": 1, **report}
    return CompareConfig(task="toy_task:ToyTask", out_dir=str(tmp_path / "cmp"), base={},
                         teacher={"model": {"width": 4}}, methods={"student": {}, "kd": {}},
                         seeds=list(seeds), report=settings)


def _report(tmp_path, task=None, seeds=(0,), **report):
    config = _config(tmp_path, seeds, **report)
    task = task or ToyTask()
    settings = report_settings(config.report, task)
    return build_report(config, task, _results(tmp_path, seeds), settings, 4, "cpu")


def _cells(table: list[str], column: int) -> list[str]:
    return [line.split(" | ")[column].strip("| ") for line in table[2:]]


def test_one_seed_says_n_1_instead_of_a_zero_spread(tmp_path):
    table = render_table(_report(tmp_path))
    assert all(cell.endswith("(n = 1)") for cell in _cells(table, 1))
    assert "±" not in "\n".join(table)


def test_several_seeds_show_the_spread_and_the_single_teacher_says_n_1(tmp_path):
    cells = _cells(render_table(_report(tmp_path, seeds=(0, 1, 2))), 1)
    assert cells[0].endswith("(n = 1)")  # the teacher: one model
    assert all(" ± " in cell for cell in cells[1:])


def test_every_number_of_a_column_has_the_same_format(tmp_path):
    table = render_table(_report(tmp_path))
    for column in (1, 3, 5):  # mse, GFLOPs, the interval
        decimals = {len(number.split(".")[1]) for cell in _cells(table, column)
                    for number in re.findall(r"\d+\.\d+", cell)}
        assert len(decimals) == 1, (column, _cells(table, column))
    assert column_digits([0.5944, 1.04, 0.0828], 4) == 3
    assert column_digits([263.0, 71.0], 3) == 0
    assert column_digits([None, 0.0], 3) == 2


def test_units_the_task_states_are_in_the_header(tmp_path):
    assert "| mse (pixel²) |" in render_table(_report(tmp_path, UnitTask()))[0]
    assert "| mse |" in render_table(_report(tmp_path / "plain"))[0]


def test_results_of_different_lengths_are_not_paired(tmp_path):
    results = _results(tmp_path)
    results[-1].per_image.pop()
    with pytest.raises(DataError, match="'kd' \\(seed 0, 3 test images\\).*4 images"):
        _paired(results, "student", "mse")


def test_the_teacher_is_paired_with_every_seeds_baseline(tmp_path):
    """One teacher against three seeds' students: its differences are averaged over the
    three baselines, not taken against seed 0's alone."""
    results = _results(tmp_path, seeds=(0, 1, 2))
    teacher = np.array([image["mse"] for image in results[0].per_image])
    bases = np.array([[image["mse"] for image in r.per_image]
                      for r in results if r.name == "student"])
    assert len(bases) == 3
    paired = _paired(results, "student", "mse")
    np.testing.assert_allclose(paired["teacher"], (teacher - bases).mean(axis=0), rtol=1e-12)
    assert not np.allclose(paired["teacher"], teacher - bases[0])
    report = _report(tmp_path / "report", seeds=(0, 1, 2))
    assert report.rows[0].method == "teacher" and report.rows[0].delta is not None
    assert "teacher" in report.intervals


def test_report_settings_are_checked_when_read():
    for bad, message in (({"examples": -1}, "examples"), ({"exampels": 2}, "unknown key"),
                         ({"examples": "4"}, "expected int"), ({"better": "up"}, "better"),
                         ({"flops_size": [0, 8]}, "flops_size"),
                         ({"latency_size": [8]}, "latency_size")):
        with pytest.raises(ConfigError, match=message):
            report_settings(bad)
    assert report_settings({}, ToyTask()).primary == "mse"


class NoPrimaryTask:
    build_model, flops_inputs = ToyTask.build_model, ToyTask.flops_inputs


def test_without_a_primary_metric_the_first_metric_is_ranked(tmp_path):
    report = _report(tmp_path, NoPrimaryTask())
    assert report.settings.primary == "mse" and report.settings.better == "lower"
    assert "Δmse vs student" in render_table(report)[0]


def test_unknown_report_columns_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'SAD'"):
        _report(tmp_path, columns=["mse", "SAD"])


def test_curve_styles_stay_distinct_past_the_ten_colours():
    """The cpu report plots 13 runs: the 11th must not look like the 1st."""
    styles = [tuple(line_style(i).values()) for i in range(30)]
    assert len(set(styles)) == 30
    assert line_style(10) == {"color": "C0", "linestyle": "--"}


def test_task_loss_curves_skip_runs_whose_log_lacks_it(tmp_path):
    results = _results(tmp_path / "new") + [
        ModelResult("old", 0, {"width": 4}, [{"mse": 0.1}] * 4,
                    _run(tmp_path / "old", "old", 0, [{"step": 2, "total": 5.0}]))]
    curves = training_curves(results)
    assert set(curves["task_loss"]) == {"student", "kd"}
    assert set(curves["total"]) == {"student", "kd", "old"}
    assert curves["total"]["old"] == [(2, 5.0)] and curves["task_loss"]["kd"][0] == (2, 2.0)


@pytest.mark.parametrize("examples", [0, 1])
def test_examples_zero_draws_no_examples_figure_and_links_none(tmp_path, examples):
    config = _config(tmp_path, examples=examples)
    teacher_weights = _run(tmp_path, "teacher", 0, []) / "model.pt"
    _, eval_set = ToyTask().datasets({})
    out = write_compare_report(config, ToyTask(), _results(tmp_path), str(teacher_weights),
                               eval_set, "cpu")
    assert (out / "examples.png").exists() == bool(examples)
    assert ("examples.png" in (out / "results.md").read_text()) == bool(examples)
    assert (out / "curves.png").exists() and (out / "metrics.png").exists()


@pytest.mark.parametrize("log", [["jsonl"], ["jsonl", "tensorboard"]])
def test_figures_go_to_tensorboard_when_the_runs_log_there(tmp_path, log):
    accumulator = pytest.importorskip(  # kdkit[tensorboard]; in the dev extra, so CI has it
        "tensorboard.backend.event_processing.event_accumulator")
    EventAccumulator = accumulator.EventAccumulator

    config = _config(tmp_path, examples=1)
    config.base = {"train": {"log": log}}
    teacher_weights = _run(tmp_path, "teacher", 0, []) / "model.pt"
    _, eval_set = ToyTask().datasets({})
    out = write_compare_report(config, ToyTask(), _results(tmp_path), str(teacher_weights),
                               eval_set, "cpu")
    assert (out / "tensorboard").exists() == ("tensorboard" in log)
    if "tensorboard" in log:
        events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        assert sorted(events.Tags()["images"]) == [
            "report/curves", "report/examples", "report/metrics"]
        image = events.Images("report/metrics")[0]
        assert (image.width, image.height) == plt_size(out / "metrics.png")


def plt_size(png) -> tuple[int, int]:
    import matplotlib.pyplot as plt

    height, width = plt.imread(png).shape[:2]
    return width, height


def test_the_report_names_the_commit_and_the_library_versions(tmp_path):
    text = render_markdown(_report(tmp_path))
    line = provenance.provenance_line()
    assert line in text
    for library in ("torch", "Triton", "timm"):
        assert f"{library} " in line


def _git(folder, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=folder,
                   check=True, capture_output=True)


def test_commit_is_the_short_head_plus_dirty_and_unknown_outside_git(tmp_path, monkeypatch):
    monkeypatch.delenv(provenance.ENV_COMMIT, raising=False)
    assert provenance.kdkit_commit(tmp_path) == "unknown"
    monkeypatch.setenv(provenance.ENV_COMMIT, "abc1234")  # a copy sent without its .git
    assert provenance.kdkit_commit(tmp_path) == "abc1234"
    monkeypatch.delenv(provenance.ENV_COMMIT)
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path,
                          capture_output=True, text=True).stdout.strip()
    assert provenance.kdkit_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two")
    assert provenance.kdkit_commit(tmp_path) == f"{head}+dirty"
    assert provenance.library_version("no-such-distribution-kdkit") == "not installed"
