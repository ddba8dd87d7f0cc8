"""DCP end to end on the CPU: sparsify with distillation, prune, retrain (re-initialised
and inherited), with tiny DIM models."""

import json

import torch
import yaml
from torch import nn

from kdkit.checkpoint import load_checkpoint
from kdkit.cli import main
from kdkit.provenance import provenance
from kdkit.pruning import load_pruned
from kdkit.task import load_task
from kdkit.train import build_model

WIDE = {"name": "dim", "encoder_channels": [[8], [16], [16], [16], [16]],
        "decoder_channels_dim": [16, 16, 16, 8, 1]}
DATA = {"kind": "synthetic", "train_length": 16, "test_length": 2, "size": 48,
        "crop_sizes": [32], "output_size": 32}
TRAIN = {"steps": 3, "batch_size": 4, "log_every": 1, "checkpoint_every": 3}


def write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_sparsify_prune_retrain(tmp_path):
    teacher = {"task": "matting", "out_dir": str(tmp_path / "teacher"), "model": WIDE,
               "data": DATA, "train": TRAIN}
    assert main(["train", write(tmp_path / "teacher.yaml", teacher), "--quiet"]) == 0
    teacher_spec = {"model": WIDE, "checkpoint": str(tmp_path / "teacher" / "model.pt")}
    sparse = {
        "task": "matting", "out_dir": str(tmp_path / "sparse"), "model": WIDE, "data": DATA,
        "train": TRAIN, "loss": {"alpha": 0.5, "teacher_alpha": 0.5},
        "teacher": teacher_spec, "sparsity": {"conv": 1e-4, "deconv": 1e-5},
        "distillation": [{"loss": "spatial_channel_similarity", "student": f"conv{k}.out",
                          "teacher": f"conv{k}.out"} for k in (2, 3, 4, 5)],
    }
    write(tmp_path / "sparse.yaml", sparse)
    prune = {"task": "matting", "sparse": "sparse.yaml", "fractions": {"conv": 0.5,
             "deconv": 0.5}, "ignored": ["deconv1.conv"], "input_size": [32, 32],
             "output": str(tmp_path / "pruned.pt")}
    assert main(["prune", write(tmp_path / "prune.yaml", prune), "--quiet"]) == 0

    log = [json.loads(line) for line in (tmp_path / "sparse" / "log.jsonl").read_text()
           .splitlines()]
    assert all("bn_l1" in r for r in log if r["kind"] == "train")
    state = load_checkpoint(tmp_path / "sparse" / "model.pt")["model"]
    assert all((v == 0).all() for k, v in state.items() if k.endswith("bn.bias"))  # frozen β
    summary = json.loads((tmp_path / "pruned.json").read_text())
    assert summary["parameters"]["after"] < 0.6 * summary["parameters"]["before"]
    assert summary["gflops"]["after"] < summary["gflops"]["before"]
    assert summary["provenance"] == provenance()  # the commit and versions it ran with

    task = load_task("matting")
    pruned_spec = {**WIDE, "pruned": str(tmp_path / "pruned.pt")}
    inherited = build_model(task, pruned_spec)
    saved = load_pruned(lambda: task.build_model(WIDE), tmp_path / "pruned.pt")
    for (name, a), (_, b) in zip(inherited.state_dict().items(), saved.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = build_model(task, {**pruned_spec, "reinit": True})
    assert not torch.equal(fresh.conv1.units[0].conv.weight, saved.conv1.units[0].conv.weight)
    assert sum(p.numel() for p in fresh.parameters()) == summary["parameters"]["after"]

    for reinit in (True, False):
        retrain = {**sparse, "out_dir": str(tmp_path / f"retrain-{reinit}"),
                   "model": {**pruned_spec, "reinit": reinit}, "sparsity": None,
                   "distillation": [{"loss": "spatial_similarity", "student": f"conv{k}.out",
                                     "teacher": f"conv{k}.out"} for k in (2, 3, 4, 5)]}
        path = write(tmp_path / f"retrain-{reinit}.yaml", retrain)
        assert main(["train", path, "--quiet"]) == 0
        model = build_model(task, retrain["model"])
        assert isinstance(model.conv1.units[0].bn, nn.BatchNorm2d)
