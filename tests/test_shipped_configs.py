"""Every config that ships with the tasks loads through the loader its kind needs, and the
CPU-sized distillation config trains: a user's first `kdkit train` works as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdkit.compare import load_compare_config, method_runs
from kdkit.config import from_mapping, load_run_config, load_yaml
from kdkit.dcp import PruneConfig
from kdkit.task import load_task
from kdkit.train import read_log, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(ROOT.glob("tasks/*/configs/**/*.yaml"))
SPKD_CPU = ROOT / "tasks/matting/configs/tiny/spkd.yaml"


def _kind(data: dict) -> str:
    if "methods" in data:
        return "compare"
    if "sparse" in data:
        return "prune"
    if "out_dir" in data:
        return "run"
    return "methods"  # a compare config's methods file, checked through its compare config


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    data = load_yaml(path)
    kind = _kind(data)
    if kind == "run":
        run = load_run_config(path)
        assert run.train.steps >= 1 and run.train.lr > 0
    elif kind == "compare":
        config = load_compare_config(path)
        assert method_runs(config)
    elif kind == "prune":
        from_mapping(PruneConfig, data, str(path))
    else:
        users = [p for p in CONFIGS if p != path and _kind(load_yaml(p)) == "compare"
                 and load_yaml(p)["methods"] == path.name]
        assert users, f"{path} is neither a run, compare nor prune config, nor used by one"


def test_the_cpu_distillation_config_is_cpu_sized_and_trains(tmp_path):
    run = load_run_config(SPKD_CPU, ["train.steps=2", "train.log_every=1",
                                     "data.test_length=2", f"out_dir={tmp_path}"])
    assert run.train.lr == pytest.approx(2e-3)  # written `2e-3`: a float, not a string
    assert run.distillation and run.teacher
    train(run, load_task(run.task), progress=False)
    record = read_log(tmp_path, "train")[-1]
    assert {t.display_name() for t in run.distillation} <= set(record)
