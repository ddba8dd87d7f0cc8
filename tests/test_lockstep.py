"""Students in lockstep: each row equals the same row trained alone (plain student, the
teacher's prediction as a task loss, a feature method with adapters, OFD), a killed group
resumes row by row, and the grouping and memory plan (fake numbers)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from toy_task import ToyNet, ToyTask

from kdkit.checkpoint import load_checkpoint, save_atomic
from kdkit.compare import load_compare_config, method_runs
from kdkit.config import run_config_from_mapping
from kdkit.task import load_task
from kdkit.train import train
from kdkit.training.lockstep import (
    alone_reason,
    group_size,
    lockstep_groups,
    row_key,
    train_lockstep,
)
from kdkit.training.run import build_teacher

TINY = Path(__file__).parents[1] / "tasks/matting/configs/compare/tiny.yaml"


def _moved(config, out: Path):
    return dataclasses.replace(config, out_dir=str(out / Path(config.out_dir).parent.name))


def _same_weights(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first / "checkpoint.pt"), load_checkpoint(second / "checkpoint.pt")
    for part in ("model", "distiller"):
        flat_a = {k: v for k, v in _flat(a.get(part, {}))}
        flat_b = {k: v for k, v in _flat(b.get(part, {}))}
        assert flat_a.keys() == flat_b.keys()
        for key, value in flat_a.items():
            torch.testing.assert_close(value, flat_b[key], rtol=1e-5, atol=1e-6, msg=key)


def _flat(state, prefix=""):
    for key, value in state.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        elif isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value


def test_each_matting_row_in_lockstep_equals_the_row_trained_alone(tmp_path):
    config = load_compare_config(TINY, [
        "only=[student,hinton,spatial+channel,ofd]", "base.train.steps=3",
        "base.train.batch_size=2", "base.train.checkpoint_every=2",
        "base.data.train_length=8", "base.data.test_length=2", "base.data.size=48",
        "base.data.crop_sizes=[32,48]", "base.data.output_size=32"])
    runs = [run for _, _, run, _ in method_runs(config)]
    assert len(lockstep_groups([row_key(r) for r in runs])) == 1
    task = load_task("matting")
    together = [_moved(r, tmp_path / "together") for r in runs]
    train_lockstep(together, task, progress=False)
    for run in runs:
        alone = _moved(run, tmp_path / "alone")
        train(alone, task, progress=False)
        _same_weights(Path(alone.out_dir), tmp_path / "together" / Path(alone.out_dir).name)


def toy_rows(tmp_path: Path, steps: int) -> list:
    """A plain toy student and one with a channel term through a 1×1 adapter."""
    teacher = tmp_path / "teacher.pt"
    if not teacher.exists():
        torch.manual_seed(0)
        save_atomic({"model": ToyNet(8).state_dict()}, teacher)
    base = {"task": "toy_task:ToyTask", "model": {"width": 4},
            "train": {"steps": steps, "batch_size": 4, "log_every": 1, "checkpoint_every": 2,
                      "schedule": "constant"}}
    kd = {"distillation": [{"loss": "channel_similarity", "student": "body.3",
                            "teacher": "body.3", "adapter": "conv1x1"}],
          "teacher": {"model": {"width": 8}, "checkpoint": str(teacher)}}
    return [run_config_from_mapping({**base, **extra, "out_dir": str(tmp_path / name)})
            for name, extra in (("student", {}), ("channel", kd))]


def test_a_killed_group_resumes_row_by_row_to_the_same_weights(tmp_path):
    train_lockstep(toy_rows(tmp_path / "whole", 6), ToyTask(), progress=False)
    # "killed" at step 2: both rows checkpointed there; then the plain row's folder is lost
    train_lockstep(toy_rows(tmp_path / "cut", 2), ToyTask(), progress=False)
    for name in ("model.pt", "checkpoint.pt", "log.jsonl"):
        (tmp_path / "cut" / "student" / name).unlink()
    train_lockstep(toy_rows(tmp_path / "cut", 6), ToyTask(), progress=False)
    for name in ("student", "channel"):
        _same_weights(tmp_path / "whole" / name, tmp_path / "cut" / name)


def test_rows_group_by_data_seed_and_teacher_and_pruned_rows_train_alone():
    rows = [("a", None), ("a", "T"), ("b", None), (None, "T"), ("a", "U"), ("a", "T")]
    assert lockstep_groups(rows) == [[0, 1, 5], [2], [3], [4]]
    assert lockstep_groups([("a", None), ("a", None)]) == [[0, 1]]
    config = run_config_from_mapping({"task": "toy_task:ToyTask", "out_dir": "x",
                                      "model": {"width": 4, "pruned": "p.pt"}})
    assert alone_reason(config) == "a pruned model" and row_key(config)[0] is None
    other_seed = run_config_from_mapping({"task": "toy_task:ToyTask", "out_dir": "x",
                                          "model": {"width": 4}, "train": {"seed": 1}})
    same = run_config_from_mapping({"task": "toy_task:ToyTask", "out_dir": "y",
                                    "model": {"width": 8}})
    assert row_key(other_seed)[0] != row_key(same)[0]


@pytest.mark.parametrize("capacity, shared, per_row, rows, expected", [
    (100, 5, 10, 12, 8),    # 100 × 0.85 − 5 = 80 bytes: eight rows of 10
    (100, 5, 10, 3, 3),     # all fit
    (100, 80, 10, 5, 1),    # not even one: one at a time
    (100, 5, 0, 4, 4),      # nothing measured per row (the CPU): all
])
def test_the_group_size_comes_from_the_measured_step(capacity, shared, per_row, rows,
                                                     expected):
    assert group_size(capacity, shared, per_row, rows) == expected


def count_teacher_forwards(monkeypatch) -> list:
    """A list that grows by one with each forward of the teacher lockstep builds."""
    from kdkit.training import lockstep

    calls = []

    def counted_teacher(config, task, device):
        teacher = build_teacher(config, task, device)
        teacher.register_forward_hook(lambda *args: calls.append(1))
        return teacher

    monkeypatch.setattr(lockstep, "build_teacher", counted_teacher)
    return calls


def test_the_teacher_runs_once_per_batch_for_every_row(tmp_path, monkeypatch):
    calls = count_teacher_forwards(monkeypatch)
    student, channel = toy_rows(tmp_path, 3)
    spatial = dataclasses.replace(channel, out_dir=str(tmp_path / "spatial"), distillation=[
        dataclasses.replace(channel.distillation[0], loss="spatial_similarity", adapter=None)])
    train_lockstep([student, channel, spatial], ToyTask(), progress=False)
    assert len(calls) == 2 + 3  # each distiller's sizing forward, then one per batch


def test_lockstep_false_in_the_config_trains_the_rows_one_by_one():
    from kdkit.compare_plan import training_groups

    config = load_compare_config(TINY, ["lockstep=false", "only=[student,hinton,ofd]"])
    runs = [run for _, _, run, _ in method_runs(config)]
    assert training_groups(runs, config.lockstep) == [[run] for run in runs]
    assert training_groups(runs, lockstep=True) == [runs]
