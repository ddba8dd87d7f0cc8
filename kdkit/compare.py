"""``kdkit compare``: train a teacher and many student methods over seeds, evaluate them on
one test set, and write a report (:mod:`kdkit.report`).

A compare config names the task, a ``base`` run (the student's model, data, loss and
training), the ``teacher`` (a ``checkpoint``, or ``train:`` settings to train it here), the
``methods`` (each a set of overrides of the base: ``loss``, ``distillation``, ``model``,
``train``; or with ``prune:``, a DCP method that sparsifies and prunes first), the
``seeds`` and the ``baseline`` method. Every method and seed is a normal
run folder under ``out_dir/<method>/seed<k>``: finished runs are reused and interrupted
ones resume, so running the command again continues where it stopped. The rows of a seed
train in lockstep (:mod:`kdkit.training.lockstep`; ``lockstep: false`` one by one), and a
``budget`` chooses the steps (:mod:`kdkit.training.budget`). The training is a list of
entries (:mod:`kdkit.compare_plan`: the teacher, prune jobs, lockstep groups or rows of each
seed), run here in order, or one job each (``--plan``, ``--entry``) before the report.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.checkpoint import save_atomic
from kdkit.compare_plan import (
    Entry,
    finished,
    plan_entries,
    run_entries,
    training_chunks,
    training_groups,
    training_notes,
)
from kdkit.config import TEACHER_PREFIX, RunConfig, from_mapping, load_yaml, run_config_from_mapping
from kdkit.distributed import World, end_world, setup_world
from kdkit.errors import ConfigError, PlanError
from kdkit.evaluation_cache import (
    TRAINING_FREE,
    evaluate_cached,
    evaluate_training_free,
    evaluation_key,
    is_training_free,
    training_free_method,
)
from kdkit.report import (
    ModelResult,
    check_metric_names,
    report_settings,
    unpruned_spec,
    write_compare_report,
)
from kdkit.task import Task
from kdkit.train import WEIGHTS, build_model, resolve_device
from kdkit.training.budget import (
    BudgetPlan,
    evaluation_reserve,
    group_timing,
    image_seconds,
    parse_duration,
    plan_steps,
)
from kdkit.training.stop import stop_signals

__all__ = ["CompareConfig", "comparison_entries", "evaluation_key", "is_training_free",
           "load_compare_config", "method_runs", "needs_teacher", "run_compare",
           "training_free_rows"]


@dataclass
class CompareConfig:
    """A comparison: see the module docstring."""

    task: str
    out_dir: str
    base: dict[str, Any]
    teacher: dict[str, Any]
    methods: dict[str, Any] | str
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = "student"
    only: list[str] | None = None  # run just these methods, in this order
    report: dict[str, Any] = field(default_factory=dict)
    budget: str | float | None = None  # a time budget: 90s, 8m, 1h or seconds
    lockstep: bool = True  # train the rows of a seed together (false: one after another)


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: mappings recursively, anything else replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """A :class:`CompareConfig` from YAML; ``methods`` may name another YAML file (relative
    to this one). Overrides (``KEY=VALUE``) apply to the whole config."""
    from kdkit.config import apply_overrides

    path = Path(path)
    data = apply_overrides(load_yaml(path), overrides or [])
    config = from_mapping(CompareConfig, data, "")  # errors name key paths (seeds, base…)
    if isinstance(config.methods, str):
        config.methods = load_yaml(path.parent / config.methods)
    if not isinstance(config.methods, dict) or not config.methods:
        raise ConfigError(f"{path}: methods must be a non-empty mapping of name → overrides")
    if config.only is not None:
        missing = [name for name in config.only if name not in config.methods]
        if missing:
            raise ConfigError(f"{path}: only names unknown methods {missing}; known: "
                              f"{', '.join(config.methods)}")
        config.methods = {name: config.methods[name] for name in config.only}
    if config.baseline not in config.methods:
        raise ConfigError(f"{path}: baseline {config.baseline!r} is not among the methods: "
                          f"{', '.join(config.methods)}")
    _check_training_free_specs(config, path)
    report_settings(config.report)  # checked now, not after every run has trained
    if config.budget is not None:
        parse_duration(config.budget)
    return config


def _check_training_free_specs(config: CompareConfig, path: Path) -> None:
    """A training-free method is ``{training_free: <name>}`` alone, and not the baseline."""
    for name, spec in config.methods.items():
        if is_training_free(spec) and set(spec) != {TRAINING_FREE}:
            raise ConfigError(f"{path}: methods.{name}: a training-free method takes only "
                              f"'{TRAINING_FREE}: <name>', found {sorted(spec)}")
    if is_training_free(config.methods[config.baseline]):
        raise ConfigError(f"{path}: baseline {config.baseline!r} is training-free; the "
                          "baseline must be a trained method")


def training_free_rows(config: CompareConfig, task: Task) -> dict[str, str]:
    """{row label: the task's training-free method} of the methods ``{training_free:
    name}``; a name the task lacks is a ConfigError listing the task's methods."""
    rows = {label: spec[TRAINING_FREE] for label, spec in config.methods.items()
            if is_training_free(spec)}
    for label, name in rows.items():
        training_free_method(task, name, f"methods.{label}")
    return rows


def _run_dir(config: CompareConfig, method: str, seed: int) -> Path:
    return Path(config.out_dir) / method.replace(" ", "_") / f"seed{seed}"


def teacher_run(config: CompareConfig):
    """The teacher's run config when the teacher is trained here, else ``None``."""
    spec = config.teacher
    if "checkpoint" in spec:
        return None
    data = deep_merge(config.base, {"loss": spec.get("loss", {}), "train": spec.get("train", {})})
    data.update(task=config.task, model=spec["model"],
                out_dir=str(Path(config.out_dir) / "teacher"))
    return run_config_from_mapping(data, "teacher")


def teacher_checkpoint(config: CompareConfig) -> str:
    if "model" not in config.teacher:
        raise ConfigError("teacher needs 'model' and either 'checkpoint' or 'train'")
    if "checkpoint" in config.teacher:
        return config.teacher["checkpoint"]
    return str(Path(config.out_dir) / "teacher" / "model.pt")


def needs_teacher(data: dict) -> bool:
    """Whether a run needs the teacher: it has distillation terms, or a non-zero task loss
    weight named ``teacher_*`` (a task loss against the teacher's prediction, such as the
    matting task's ``teacher_alpha``; see :class:`kdkit.task.Task`)."""
    loss = data.get("loss") or {}
    return bool(data.get("distillation")) or any(
        key.startswith(TEACHER_PREFIX) and value for key, value in loss.items())


def _with_teacher(config: CompareConfig, data: dict) -> dict:
    """Give a run the teacher when its losses or terms need one."""
    if needs_teacher(data):
        data["teacher"] = {"model": config.teacher["model"],
                           "checkpoint": teacher_checkpoint(config)}
    return data


def _sparse_run(config: CompareConfig, overrides: dict) -> dict:
    """The sparsify run's config data (without ``out_dir`` and seed): ``overrides`` merged
    into the base, a ``model`` replaced whole (``teacher``: the teacher's architecture),
    and the teacher when its terms need one."""
    sparse = deep_merge(config.base, {k: v for k, v in overrides.items() if k != "model"})
    if overrides.get("model") == "teacher":
        sparse["model"] = copy.deepcopy(config.teacher["model"])
    elif "model" in overrides:  # a model is replaced whole, never merged with the base's
        sparse["model"] = copy.deepcopy(overrides["model"])
    sparse["task"] = config.task
    return _with_teacher(config, sparse)


def _prune_job(config: CompareConfig, spec: dict, seed: int) -> tuple:
    """(prune config for :func:`kdkit.dcp.prune_run`, the pruned model's spec) of a
    method with a ``prune:`` block: ``{sparse: <overrides of base for the sparsify run>,
    fractions, ignored, input_size, reinit}``. ``sparse.model: teacher`` sparsifies the
    teacher's architecture (DCP's full-width student), fresh. The sparsify run and pruned
    model live in ``out_dir/pruned/<hash>/seed<k>/``, the hash of everything that makes
    them (the whole sparsify run's config and the pruning settings): methods that differ
    only in ``reinit`` share them, and a change to the base makes new ones."""
    prune = dict(spec)
    reinit = prune.pop("reinit", True)
    sparse = _sparse_run(config, dict(prune.pop("sparse", {})))
    made_of = json.dumps({"sparse": sparse, **prune}, sort_keys=True, default=str)
    shared = (Path(config.out_dir) / "pruned" / hashlib.sha1(made_of.encode()).hexdigest()[:10]
              / f"seed{seed}")
    sparse["out_dir"] = str(shared / "sparse")
    sparse.setdefault("train", {})["seed"] = seed
    job = {"task": config.task, "sparse": sparse, "output": str(shared / "pruned.pt"), **prune}
    return job, {**sparse["model"], "pruned": job["output"], "reinit": reinit}


def method_runs(config: CompareConfig, w2: float | None = None) -> list[tuple]:
    """(method name, seed, run config, prune job or None) for every method and seed.
    With ``w2`` the distillation weights of every method with feature terms are multiplied
    by it and its name gains ``@w2=<value>``. A method with ``prune:`` first sparsifies and
    prunes (DCP), then trains the pruned model with its own loss and terms. Training-free
    methods have no runs."""
    runs = []
    for name, spec in config.methods.items():
        if is_training_free(spec):
            continue  # never trained: see training_free_rows
        spec = dict(spec or {})
        prune = spec.pop("prune", None)
        has_terms = bool(spec.get("distillation"))
        label = f"{name}@w2={w2:g}" if w2 is not None and has_terms else name
        for seed in config.seeds:
            run_dir = _run_dir(config, label, seed)
            data = deep_merge(config.base, spec)
            data.update(task=config.task, out_dir=str(run_dir))
            data.setdefault("train", {})["seed"] = seed
            job = None
            if prune is not None:
                job, data["model"] = _prune_job(config, prune, seed)
            _with_teacher(config, data)
            if has_terms and w2 is not None:
                for term in data["distillation"]:
                    term["weight"] = term.get("weight", 1.0) * w2
            runs.append((label, seed, run_config_from_mapping(data, f"methods.{name}"), job))
    return runs


def _all_runs(config: CompareConfig, w2_values: list[float] | None) -> tuple[list, dict]:
    """([(label, seed, run config)], {run folder: prune job or None}) over the w2 values;
    methods without feature terms run once, shared across them."""
    runs, jobs = [], {}
    for w2 in (w2_values or [None]):
        for label, seed, run, job in method_runs(config, w2):
            if label in {r[0] for r in runs if r[1] == seed}:
                continue
            runs.append((label, seed, run))
            jobs[run.out_dir] = job
    return runs, jobs


def _check_report_metrics(config: CompareConfig, task: Task, run) -> None:
    """Refuse, before any training, a ``report.primary``/``columns`` that names no metric of
    the task (the metric names are those of a fresh metric collection of ``run``)."""
    metrics = task.metrics(run.metrics)
    names = list(metrics.keys()) if hasattr(metrics, "keys") else ["metric"]
    check_metric_names(report_settings(config.report, task), names)


def _evaluate_all(config: CompareConfig, task: Task, runs: list, device,
                  eval_set) -> list[ModelResult]:
    """The teacher's and every run's per-image metrics on ``eval_set`` (made from the first
    run's ``data:``), cached beside each run."""
    first = runs[0][2]
    teacher, teacher_spec = teacher_run(config), config.teacher["model"]
    results = [ModelResult(
        "teacher", 0, teacher_spec,
        evaluate_cached(task, teacher_spec, teacher_checkpoint(config), first, first.data,
                        device, eval_set, Path(config.out_dir) / "teacher_per_image.json"),
        None if teacher is None else Path(teacher.out_dir), teacher=True)]
    for label, seed, run in runs:
        run_dir = Path(run.out_dir)
        results.append(ModelResult(
            label, seed, run.model,
            evaluate_cached(task, run.model, run_dir / WEIGHTS, run, first.data, device,
                            eval_set, run_dir / "per_image.json"),
            run_dir))
    return results + _evaluate_training_free(config, task, first, device, eval_set)


def _evaluate_training_free(config: CompareConfig, task: Task, first: RunConfig, device,
                            eval_set) -> list[ModelResult]:
    """The training-free rows' per-image metrics on ``eval_set`` (cached in
    ``out_dir/training_free/<label>.json``), one result per seed (the same metrics: each
    is paired with that seed's baseline), with the median CPU seconds per image."""
    results = []
    for label, name in training_free_rows(config, task).items():
        cache = Path(config.out_dir) / "training_free" / f"{label.replace(' ', '_')}.json"
        per_image, seconds = evaluate_training_free(task, name, first, first.data, device,
                                                    eval_set, cache)
        results += [ModelResult(label, seed, {TRAINING_FREE: name}, per_image, None,
                                seconds_per_image=seconds) for seed in config.seeds]
    return results


PLAN = "budget.json"  # a budget's plan, in out_dir, keyed on the comparison it was made for
PLAN_FORMAT = 2  # bump when BudgetPlan's fields change: a stored plan is then made anew
_clock = time.perf_counter


def _warmup_teacher_weights(config: CompareConfig, task: Task, scratch: Path) -> str:
    """Teacher weights the students' warm-up can load: the configured or trained ones, or
    (before the teacher is trained) a freshly built teacher's, written into ``scratch``."""
    weights = teacher_checkpoint(config)
    if "checkpoint" in config.teacher or Path(weights).exists():
        return weights
    fresh = scratch / WEIGHTS
    save_atomic({"model": build_model(task, config.teacher["model"]).state_dict()}, fresh)
    return str(fresh)


def _timed_as(run: RunConfig) -> RunConfig:
    """What the warm-up times for ``run``: a pruned model's unpruned architecture (its
    file is not made yet; an upper bound of its step time)."""
    unpruned = unpruned_spec(run.model)
    return run if unpruned is None else dataclasses.replace(run, model=unpruned)


def _sparse_runs(jobs: dict, runs: list) -> dict[str, RunConfig]:
    """{label: sparsify run config} of the first seed's distinct prune jobs."""
    distinct = {}
    for label, seed, run in runs:
        job = jobs[run.out_dir]
        if seed == runs[0][1] and job is not None:
            distinct.setdefault(job["output"], (label, job["sparse"]))
    return {f"sparsify {label}": run_config_from_mapping(data, "sparse")
            for label, data in distinct.values()}


def _measure_and_plan(config: CompareConfig, task: Task, runs: list, jobs: dict,
                      world: World, budget_s: float) -> BudgetPlan:
    """Warm up the teacher (when it trains here and has not finished), each unit of the
    first seed's rows (a lockstep chunk, or a row alone; a pruned row as its unpruned
    architecture) and each sparsify run of a pruning method, time one evaluation forward,
    and plan the steps (:mod:`kdkit.training.budget`); a sparsify run takes the students'
    steps."""
    started, first = _clock(), runs[0][2]
    teacher = teacher_run(config)
    teacher = None if teacher is None or finished(teacher) else teacher
    teacher_build, teacher_s = (0.0, None) if teacher is None else \
        group_timing([teacher], task, world, _clock)
    with tempfile.TemporaryDirectory() as scratch:
        weights = _warmup_teacher_weights(config, task, Path(scratch))
        rows = {run.out_dir: label for label, seed, run in runs if seed == runs[0][1]}
        configs = [_with_weights(run, weights) for _, seed, run in runs if seed == runs[0][1]]
        timings = {"+".join(rows[c.out_dir] for c in chunk):
                   group_timing([_timed_as(c) for c in chunk], task, world, _clock)
                   for group in training_groups(configs, config.lockstep)
                   for chunk in training_chunks(group, task, world)}
        timings.update({label: group_timing([_with_weights(sparse, weights)], task, world,
                                            _clock)
                        for label, sparse in _sparse_runs(jobs, runs).items()})
    _, eval_set = task.datasets(first.data)
    model = build_model(task, first.model).to(world.device)
    image_s = image_seconds(model, task, eval_set, world.device, _clock)
    reserve = evaluation_reserve(image_s, len(eval_set), len(runs) + 1)
    setup = teacher_build + len(config.seeds) * sum(built for built, _ in timings.values())
    units = {label: step_s for label, (_, step_s) in timings.items()}
    spent = _clock() - started
    teacher_steps, steps = plan_steps(
        budget_s, spent, reserve + setup,
        None if teacher is None else (teacher.train.steps, teacher_s),
        first.train.steps, list(units.values()), len(config.seeds))
    return BudgetPlan(budget_s, teacher_s, units, spent, reserve, setup, teacher_steps, steps)


def _with_weights(run: RunConfig, weights: str) -> RunConfig:
    """``run`` with its teacher (if any) loaded from ``weights``."""
    if run.teacher is None:
        return run
    return dataclasses.replace(run, teacher={**run.teacher, "checkpoint": weights})


def _apply_plan(config: CompareConfig, plan: BudgetPlan,
                w2_values: list[float] | None) -> tuple[list, dict]:
    """The runs and prune jobs of ``config`` with ``plan``'s steps: the teacher's, and
    every student's and every sparsify run's (pruned models are made anew for them)."""
    if plan.teacher_steps is not None:
        config.teacher.setdefault("train", {})["steps"] = plan.teacher_steps
    config.base.setdefault("train", {})["steps"] = plan.student_steps
    for spec in config.methods.values():
        if (spec or {}).get("prune") is not None:
            sparse = spec["prune"].setdefault("sparse", {})
            sparse.setdefault("train", {})["steps"] = plan.student_steps
    runs, jobs = _all_runs(config, w2_values)
    for _, _, run in runs:
        run.train.steps = plan.student_steps
    return runs, jobs


def _budget(config: CompareConfig, task: Task, w2_values: list[float] | None, runs: list,
            jobs: dict, progress: bool) -> tuple[BudgetPlan | None, list, dict]:
    """(the plan, the runs, the prune jobs): with ``budget``, the plan (measured once,
    then read from ``out_dir/budget.json`` while the comparison it was made for is
    unchanged, so an interrupted comparison resumes with the same steps) and the runs and
    jobs with its steps (:func:`_apply_plan`); without, ``runs`` and ``jobs`` as they are."""
    if config.budget is None:
        return None, runs, jobs
    path = Path(config.out_dir) / PLAN
    made_of = {k: v for k, v in dataclasses.asdict(config).items() if k != "report"}
    key = json.loads(json.dumps({"config": made_of, "plan_format": PLAN_FORMAT,
                                 "runs": [[label, seed] for label, seed, _ in runs]},
                                sort_keys=True, default=str))
    stored = json.loads(path.read_text()) if path.exists() else {}
    if stored.get("key") == key:
        plan = BudgetPlan(**stored["plan"])
    else:
        if progress:
            print(f"warming up to plan the steps for a budget of {config.budget}")
        world = setup_world(resolve_device(runs[0][2].train.device))
        try:
            plan = _measure_and_plan(config, task, runs, jobs, world,
                                     parse_duration(config.budget))
        finally:
            end_world(world)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "plan": dataclasses.asdict(plan)}))
    if progress:
        print("\n".join(plan.lines()))
    return (plan, *_apply_plan(config, plan, w2_values))


def _checked_runs(config: CompareConfig, task: Task,
                  w2_values: list[float] | None) -> tuple[list, dict]:
    """:func:`_all_runs`, after the checks that cost seconds rather than the training (the
    report's metric names, the training-free rows' names)."""
    runs, jobs = _all_runs(config, w2_values)
    _check_report_metrics(config, task, runs[0][2])
    training_free_rows(config, task)
    return runs, jobs


def comparison_entries(config: CompareConfig, task: Task,
                       w2_values: list[float] | None = None) -> list[Entry]:
    """The comparison's entries (:mod:`kdkit.compare_plan`), for ``--plan`` and
    ``--entry``: a comparison with a ``budget`` is a :class:`PlanError` (its steps come
    from a warm-up of every row together)."""
    if config.budget is not None:
        raise PlanError(
            f"a comparison with a time budget ({config.budget}) cannot be split into "
            "independent entries: the budget's warm-up times every row together and "
            "rescales all their steps. Remove budget: (or --budget) and set the steps "
            "yourself (base.train.steps, teacher.train.steps; a run with the budget writes "
            "the steps it chose to <out_dir>/budget.json), or run the comparison with its "
            "budget in one process: kdkit compare CONFIG --budget DURATION")
    runs, jobs = _checked_runs(config, task, w2_values)
    return plan_entries(teacher_run(config), runs, jobs, config.lockstep)


def run_compare(config: CompareConfig, task: Task, w2_values: list[float] | None = None,
                progress: bool = True) -> Path:
    """Run every entry that has not finished (with a ``budget``, its steps planned first),
    evaluate everything per image, write the report; returns the report folder."""
    runs, jobs = _checked_runs(config, task, w2_values)
    plan, runs, jobs = _budget(config, task, w2_values, runs, jobs, progress)
    entries = plan_entries(teacher_run(config), runs, jobs, config.lockstep)
    with stop_signals():  # a signal stops the run in flight, checkpointed (kdkit.training.stop)
        run_entries(entries, task, config.lockstep, progress)
    first = runs[0][2]
    device = resolve_device(first.train.device)
    _, eval_set = task.datasets(first.data)
    results = _evaluate_all(config, task, runs, device, eval_set)
    return write_compare_report(config, task, results, teacher_checkpoint(config), eval_set,
                                device, ([] if plan is None else plan.lines())
                                + training_notes(runs))
