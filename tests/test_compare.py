"""A two-method, one-seed, few-step comparison on the CPU writes every report file."""

import csv
import json

import numpy as np
import pytest
import yaml
from toy_task import ToyData, ToyNet, ToyTask

from kdkit import evaluation_cache
from kdkit.checkpoint import save_atomic
from kdkit.cli import main
from kdkit.compare import load_compare_config, method_runs
from kdkit.compare_plan import finished
from kdkit.config import ConfigError, run_config_from_mapping
from kdkit.report import bootstrap_interval
from kdkit.training.folder import RunFolder

NARROW = {"name": "dim", "encoder_channels": [[4], [8], [8], [16], [16]],
          "decoder_channels_dim": [16, 8, 8, 4, 1], "adapter_channels": [16, 16, 16, 16]}
TEACHER = {"name": "dim", "encoder_channels": [[8], [16], [16], [16], [16]],
           "decoder_channels_dim": [16, 16, 16, 8, 1]}
METHODS = {
    "student": {"loss": {"alpha": 1.0}},
    "spatial+channel": {
        "loss": {"alpha": 0.5, "teacher_alpha": 0.5},
        "distillation": [{"loss": "spatial_channel_similarity", "student": f"conv{k}.adapter",
                          "teacher": f"conv{k}.out"} for k in (2, 3, 4, 5)],
    },
}


def compare_config(tmp_path, **extra):
    config = {
        "task": "matting",
        "out_dir": str(tmp_path / "cmp"),
        "seeds": [0],
        "methods": "methods.yaml",
        "report": {"examples": 2, "flops_size": [64, 64], "latency_size": [32, 32],
                   "smoke_scale": True},
        "teacher": {"model": TEACHER, "train": {"steps": 3}},
        "base": {
            "model": NARROW,
            "data": {"kind": "synthetic", "train_length": 16, "test_length": 3, "size": 48,
                     "crop_sizes": [32], "output_size": 32},
            "train": {"steps": 4, "batch_size": 4, "log_every": 2, "checkpoint_every": 2},
        },
        **extra,
    }
    (tmp_path / "methods.yaml").write_text(yaml.safe_dump(METHODS, sort_keys=False))
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_compare_writes_every_report_file_and_reuses_finished_runs(tmp_path, capsys):
    path = compare_config(tmp_path)
    assert main(["compare", str(path), "--quiet"]) == 0
    report = tmp_path / "cmp" / "report"
    for name in ("results.csv", "results.md", "metrics.png", "curves.png", "examples.png"):
        assert (report / name).stat().st_size > 0, name
    with open(report / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["seed"]) for r in rows] == [
        ("teacher", "0"), ("student", "0"), ("spatial+channel", "0")]
    assert {"SAD", "MSE", "Grad", "Conn", "params", "gflops", "train_ms_per_step"} <= set(rows[0])
    table = (report / "results.md").read_text()
    assert "Smoke-scale run" in table and "| spatial+channel |" in table
    assert "ΔSAD vs student [95% CI]" in table
    printed = capsys.readouterr().out
    assert "| student |" in printed

    # a second run reuses everything: no run folder changes
    log = tmp_path / "cmp" / "student" / "seed0" / "log.jsonl"
    before = log.read_text()
    assert main(["compare", str(path), "--quiet"]) == 0
    assert log.read_text() == before


def test_w2_sweep_scales_feature_terms_and_names_runs(tmp_path):
    config = load_compare_config(compare_config(tmp_path))
    runs = {label: run for label, _, run, _ in method_runs(config, w2=10.0)}
    assert set(runs) == {"student", "spatial+channel@w2=10"}
    assert [t.weight for t in runs["spatial+channel@w2=10"].distillation] == [10.0] * 4
    assert runs["student"].distillation is None


def test_pruned_models_are_shared_only_by_identical_sparsify_runs(tmp_path):
    methods = {"student": METHODS["student"],
               "dcp": {"prune": {"sparse": {"sparsity": {"conv": 1e-4}}}}}
    path = compare_config(tmp_path)
    (tmp_path / "methods.yaml").write_text(yaml.safe_dump(methods))
    config = load_compare_config(path)

    def pruned_output(config):
        return [job["output"] for _, _, _, job in method_runs(config) if job][0]

    before = pruned_output(config)
    config.base["train"]["lr"] = 0.5  # the sparsify run changes: a new pruned model
    assert pruned_output(config) != before


def test_a_finished_run_is_reused_only_with_the_config_it_was_made_with(tmp_path):
    run = run_config_from_mapping({"task": "toy_task:ToyTask", "model": {"width": 4},
                                   "out_dir": str(tmp_path / "run"), "train": {"steps": 4}})
    folder = RunFolder(tmp_path / "run", writes=True)
    folder.path.mkdir()
    folder.write_config(run)
    save_atomic({"model": ToyNet(4).state_dict()}, folder.weights)
    (folder.path / "log.jsonl").write_text(json.dumps({"kind": "eval", "step": 4}) + "\n")
    assert finished(run)
    run.train.log_every = 1  # safe to change
    assert finished(run)
    run.train.lr = 0.5  # the weights were not made with this
    assert not finished(run)


def test_bad_compare_configs_are_explained(tmp_path):
    with pytest.raises(ConfigError, match="baseline 'plain'"):
        load_compare_config(compare_config(tmp_path, baseline="plain"))
    with pytest.raises(ConfigError, match="unknown methods"):
        load_compare_config(compare_config(tmp_path, only=["student", "fitnet"]))
    with pytest.raises(ConfigError, match="report.examples"):  # at load, not after training
        load_compare_config(compare_config(tmp_path, report={"examples": -1}))
    with pytest.raises(ConfigError, match=r"^seeds: expected list"):  # a key path, no file
        load_compare_config(compare_config(tmp_path, seeds=3))


def test_cached_per_image_metrics_are_keyed_on_what_produced_them(tmp_path, monkeypatch):
    evaluations = []
    monkeypatch.setattr(evaluation_cache, "per_image_metrics", lambda *args: evaluations.append(
        len(args[2])) or [{"mse": float(i)} for i in range(len(args[2]))])
    run = run_config_from_mapping({"task": "toy_task:ToyTask", "model": {"width": 4},
                                   "out_dir": str(tmp_path / "run")})
    weights, cache = tmp_path / "model.pt", tmp_path / "per_image.json"
    save_atomic({"model": ToyNet(4).state_dict()}, weights)
    task = ToyTask()

    def evaluate(length):
        data = ToyData(length, 8, 1000, [])
        return evaluation_cache.evaluate_cached(task, run.model, weights, run, {"length": length},
                                        "cpu", data, cache)

    assert len(evaluate(3)) == 3 and len(evaluate(3)) == 3 and evaluations == [3]
    assert len(evaluate(6)) == 6 and evaluations == [3, 6]  # the data changed
    save_atomic({"model": ToyNet(4).state_dict()}, weights)  # new weights
    evaluate(6)
    task.metrics_version = 2  # the task's metrics changed
    evaluate(6)
    assert evaluations == [3, 6, 6, 6]
    assert json.loads(cache.read_text())["key"]["metrics_version"]["task"] == 2


def test_bootstrap_interval():
    constant = np.full(20, 0.5)
    assert bootstrap_interval(constant) == (0.5, 0.5)
    rng = np.random.default_rng(1)
    values = rng.normal(1.0, 2.0, size=400)
    lo, hi = bootstrap_interval(values)
    half_width = 1.96 * values.std(ddof=1) / np.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - half_width, abs=0.03)
    assert hi == pytest.approx(values.mean() + half_width, abs=0.03)


WIDE = {"name": "dim", "encoder_channels": [[8], [16], [16], [16], [16]],
        "decoder_channels_dim": [16, 16, 16, 8, 1]}
DCP = {
    "prune": {
        "sparse": {"model": WIDE, "sparsity": {"conv": 1e-4, "deconv": 1e-5},
                   "loss": {"alpha": 0.5, "teacher_alpha": 0.5},
                   "distillation": [{"loss": "spatial_similarity", "student": "conv3.out",
                                     "teacher": "conv3.out"}]},
        "fractions": {"conv": 0.5, "deconv": 0.5}, "ignored": ["deconv1.conv"],
        "input_size": [32, 32],
    },
    "loss": {"alpha": 0.5, "teacher_alpha": 0.5},
}
#: A plain student and two DCP rows that differ only in ``reinit`` (one prune job).
PRUNING = {"student": METHODS["student"], "dcp": DCP,
           "dcp-inherit": {**DCP, "prune": {**DCP["prune"], "reinit": False}}}


def test_pruning_methods_sparsify_prune_and_retrain_inside_compare(tmp_path):
    path = compare_config(tmp_path)
    (tmp_path / "methods.yaml").write_text(yaml.safe_dump(PRUNING, sort_keys=False))
    assert main(["compare", str(path), "--quiet"]) == 0
    # the two rows differ only in reinit: one sparsify run and one pruned model, shared
    shared = list((tmp_path / "cmp" / "pruned").glob("*/seed0"))
    assert len(shared) == 1
    assert (shared[0] / "sparse" / "model.pt").exists()
    for method, reinit in (("dcp", True), ("dcp-inherit", False)):
        model = yaml.safe_load((tmp_path / "cmp" / method / "seed0" / "config.yaml").read_text())
        assert model["model"]["pruned"] == str(shared[0] / "pruned.pt")
        assert model["model"]["reinit"] is reinit
    with open(tmp_path / "cmp" / "report" / "results.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    summary = yaml.safe_load((shared[0] / "pruned.json").read_text())
    assert int(rows["dcp"]["params"]) == summary["parameters"]["after"]
    assert rows["dcp-inherit"]["params"] == rows["dcp"]["params"]
    assert rows["dcp-inherit"]["SAD"] != rows["dcp"]["SAD"]  # inherited ≠ re-initialised
    kept = 100 * summary["parameters"]["after"] / summary["parameters"]["before"]
    assert float(rows["dcp"]["kept_params_pct"]) == pytest.approx(kept, abs=0.05)
    assert rows["student"]["kept_params_pct"] == ""
    assert "kept % params" in (tmp_path / "cmp" / "report" / "results.md").read_text()
    assert summary["parameters"]["after"] < summary["parameters"]["before"]


def test_a_changed_config_over_old_rows_says_how_to_start_over_from_compare(tmp_path, capsys):
    path = compare_config(tmp_path)
    assert main(["compare", str(path), "--quiet"]) == 0
    changed = yaml.safe_load(path.read_text())
    changed["base"]["data"]["trimap_kernel"] = [1, 4]  # what a new kdkit's preset may do
    path.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    assert main(["compare", str(path), "--quiet"]) != 0
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert "data.trimap_kernel" in error  # what changed
    assert f"delete {tmp_path / 'cmp'} to start the whole comparison over" in error
    assert "--out NEW_FOLDER" in error
    assert "--no-resume" not in error  # `kdkit train`'s flag, not compare's
