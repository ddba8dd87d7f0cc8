"""A comparison's time budget: durations, the plan from (fake) measured step times, and
the plan applied and reported by ``kdkit compare --budget`` (measurements faked: no timing
in tests)."""

import itertools
import json

import pytest
import yaml
from toy_task import ToyTask

from kdkit import compare
from kdkit.cli import main
from kdkit.errors import ConfigError
from kdkit.train import read_log
from kdkit.training import budget
from kdkit.training.budget import (
    REPORT_ALLOWANCE_S,
    evaluation_reserve,
    parse_duration,
    plan_steps,
    seconds_per_step,
)

SPATIAL = [{"loss": "spatial_similarity", "student": "body.3", "teacher": "body.3"}]
TOY_METHODS = {"student": {}, "spatial": {"distillation": SPATIAL}}


def toy_compare(tmp_path, methods=TOY_METHODS, **extra):
    """A compare config of the toy task (teacher trained in the run); returns its path."""
    config = {"task": "toy_task:ToyTask", "out_dir": str(tmp_path / "cmp"), "seeds": [0, 1],
              "methods": methods,
              "report": {"examples": 0, "flops_size": [8, 8], "latency_size": None,
                         "primary": "metric"},
              "teacher": {"model": {"width": 8}, "train": {"steps": 40}},
              "base": {"model": {"width": 4},
                       "train": {"steps": 20, "batch_size": 4, "log_every": 2,
                                 "checkpoint_every": 4, "schedule": "constant"}},
              **extra}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("8m", 480), ("1h", 3600),
                                           ("45", 45), (300, 300), ("1.5m", 90)])
def test_durations_read_with_their_units(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["8 minutes", "m", "-5s", "0", "1d", True])
def test_bad_durations_say_what_is_expected(text):
    with pytest.raises(ConfigError, match="budget: expected a"):
        parse_duration(text)


def test_the_plan_scales_teacher_and_student_steps_by_one_factor():
    # 100 s left: teacher 40 × 0.5 s = 20 s and 2 seeds × 20 steps × (0.5 + 1.5) s = 80 s
    # fit exactly at the configured steps; 200 s left fits twice as many
    assert plan_steps(130, 20, 10, (40, 0.5), 20, [0.5, 1.5], seeds=2) == (40, 20)
    assert plan_steps(230, 20, 10, (40, 0.5), 20, [0.5, 1.5], seeds=2) == (80, 40)
    assert plan_steps(230, 20, 10, None, 20, [0.5, 1.5], seeds=2) == (None, 50)  # no teacher


def test_a_budget_too_small_for_one_step_says_how_much_is_needed():
    with pytest.raises(ConfigError, match=r"give at least 35 s"):
        plan_steps(31, 20, 10, (40, 0.5), 20, [0.5, 1.5], seeds=2)


def test_seconds_per_step_times_after_one_untimed_call():
    ticks = itertools.count(0.0, 1.0)  # a fake clock: each reading one second later
    calls, synced = [], []
    seconds = seconds_per_step(lambda: calls.append(1), 4, lambda: next(ticks),
                               lambda: synced.append(len(calls)))
    assert len(calls) == 5 and synced == [1, 5]
    assert seconds == 0.25  # two clock readings, one second apart, over four calls


def test_the_reserve_covers_two_evaluations_of_every_model():
    assert evaluation_reserve(0.1, 10, 3) == pytest.approx(6 + REPORT_ALLOWANCE_S)


def fake_measurements(monkeypatch, unit_s=0.5):
    """Fake step and image times, and a clock that advances 2 s per reading."""
    measured = []

    def fake_group_timing(configs, task, world, clock):
        measured.append([c.out_dir.rsplit("/", 2)[-2] for c in configs])
        return 1.0, 0.25 if configs[0].out_dir.endswith("teacher") else unit_s * len(configs)

    ticks = itertools.count(0.0, 2.0)
    monkeypatch.setattr(compare, "group_timing", fake_group_timing)
    monkeypatch.setattr(compare, "image_seconds", lambda *args: 0.5)
    monkeypatch.setattr(compare, "_clock", lambda: next(ticks))
    return measured


def test_compare_with_a_budget_plans_applies_and_reports_the_steps(tmp_path, monkeypatch):
    measured = fake_measurements(monkeypatch)
    path = toy_compare(tmp_path)
    # reserve: 2 × 0.5 s × 4 images × 5 models + 30 s = 50 s; warm-up: 2 s (fake clock);
    # building: 1 s for the teacher's run and 1 s per seed for the lockstep unit = 3 s
    # left 45 s = f × (40 × 0.25 + 2 seeds × 20 × (0.5 + 0.5)) = f × 50 → f = 0.9
    assert main(["compare", str(path), "--quiet", "--budget", "100s"]) == 0
    assert measured == [["cmp"], ["student", "spatial"]]  # the teacher, one lockstep unit
    cmp = tmp_path / "cmp"
    assert read_log(cmp / "teacher", "eval")[-1]["step"] == 36
    for method in ("student", "spatial"):
        for seed in (0, 1):
            assert read_log(cmp / method / f"seed{seed}", "eval")[-1]["step"] == 18
    text = (cmp / "report" / "results.md").read_text()
    assert "Time budget 100 s" in text and "students 18 steps each" in text
    assert "3 s for building the runs" in text
    assert "teacher 250.0 ms/step → 36 steps" in text and "student+spatial 1000.0" in text
    assert "in lockstep (seed 1, group 1" in text
    plan = json.loads((cmp / "budget.json").read_text())["plan"]
    assert plan["student_steps"] == 18

    # run again: the stored plan is reused (no warm-up), so every run is finished
    measured.clear()
    assert main(["compare", str(path), "--quiet", "--budget", "100s"]) == 0
    assert measured == []
    # without lockstep each row is its own unit; another comparison makes a new plan
    assert main(["compare", str(path), "--quiet", "--budget", "2m", "--no-lockstep", "--set",
                 "out_dir=" + str(tmp_path / "other")]) == 0
    assert measured == [["other"], ["student"], ["spatial"]]
    assert "alone (lockstep: false)" in (tmp_path / "other/report/results.md").read_text()


def test_a_budget_is_read_from_the_config_and_checked_at_load(tmp_path):
    with pytest.raises(ConfigError, match="budget: expected a duration"):
        compare.load_compare_config(toy_compare(tmp_path, budget="soon"))
    assert compare.load_compare_config(toy_compare(tmp_path, budget="8m")).budget == "8m"
    assert main(["compare", str(toy_compare(tmp_path)), "--budget", "later"]) == 2


def test_the_warm_up_steps_a_real_run_without_touching_its_folder(tmp_path):
    config = compare.load_compare_config(toy_compare(tmp_path))
    run = compare.method_runs(config)[0][2]
    ticks = itertools.count(0.0, 1.0)
    world = compare.setup_world(compare.resolve_device("cpu"))
    built, seconds = budget.group_timing([run], ToyTask(), world, lambda: next(ticks))
    assert built == 1.0 and seconds == pytest.approx(1 / budget.WARMUP_STEPS)
    assert not (tmp_path / "cmp").exists()


def test_a_budget_plans_the_sparsify_runs_of_pruning_methods(tmp_path, monkeypatch):
    measured = fake_measurements(monkeypatch)
    sparse = {"model": {"width": 8}, "sparsity": {"conv": 1e-4}}
    prune = {"sparse": sparse, "fractions": {"conv": 0.5}, "input_size": [8, 8]}
    methods = {"student": {}, "pruned": {"prune": prune},
               "pruned-inherit": {"prune": {**prune, "reinit": False}}}
    config = compare.load_compare_config(toy_compare(tmp_path, methods, budget="100s"))
    runs, jobs = compare._all_runs(config, None)
    before = {job["output"] for job in jobs.values() if job}
    plan, runs, jobs = compare._budget(config, ToyTask(), None, runs, jobs, progress=False)
    # timed: the teacher, the plain row, each pruned row as its unpruned architecture
    # (alone), and the one sparsify run the two pruned rows share
    assert measured == [["cmp"], ["student"], ["pruned"], ["pruned-inherit"], ["seed0"]]
    assert list(plan.unit_step_s) == ["student", "pruned", "pruned-inherit",
                                      "sparsify pruned"]
    sparse_steps = {job["sparse"]["train"]["steps"] for job in jobs.values() if job}
    assert sparse_steps == {plan.student_steps}
    assert {run.train.steps for _, _, run in runs} == {plan.student_steps}
    # the pruned models made with these steps live apart from those made without a budget
    assert not before & {job["output"] for job in jobs.values() if job}
