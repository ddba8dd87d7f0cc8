"""``kdkit prune``: DCP's sparsify and prune steps from one config.

    task: matting
    sparse: sparse.yaml            # the sparsify run (a run config with ``sparsity:``),
                                   # a path relative to this file or an inline mapping
    fractions: {conv: 0.5, deconv: 0.5}
    ignored: [deconv1.conv]        # layers whose output channels stay
    input_size: [320, 320]         # the tracing input (and the FLOPs count)
    output: runs/matting/dcp/pruned.pt

The sparsify run is trained unless it already finished; the pruned model is saved with
:func:`kdkit.pruning.save_pruned` beside a JSON summary (parameters and FLOPs before and
after, per-layer widths, and :func:`kdkit.provenance.provenance`: the kdkit commit and
library versions). Retrain it with ``kdkit train`` and ``model: {pruned: PATH, reinit:
true|false, ...}``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdkit.checkpoint import load_weights
from kdkit.config import from_mapping, load_yaml, run_config_from_mapping
from kdkit.provenance import provenance
from kdkit.pruning import channel_config, count_parameters_and_flops, prune_channels, save_pruned
from kdkit.task import Task
from kdkit.train import build_model, train

__all__ = ["PruneConfig", "prune_run"]


@dataclass
class PruneConfig:
    """See the module docstring."""

    task: str
    sparse: str | dict[str, Any]
    output: str
    fractions: dict[str, float] = field(default_factory=lambda: {"": 0.5})
    ignored: list[str] = field(default_factory=list)
    input_size: list[int] = field(default_factory=lambda: [320, 320])


def prune_run(spec: dict[str, Any], task: Task, base_dir: Path = Path("."),
              progress: bool = True) -> Path:
    """Sparsify (train, or reuse), prune and save; returns the pruned model's path."""
    config = from_mapping(PruneConfig, spec, "prune")
    sparse = config.sparse
    if isinstance(sparse, str):
        sparse = load_yaml(base_dir / sparse)
    run = run_config_from_mapping(copy.deepcopy(sparse), "sparse")
    weights = Path(run.out_dir) / "model.pt"
    if not weights.exists():
        train(run, task, progress=progress)
    model = load_weights(build_model(task, run.model), weights).eval()
    inputs = task.flops_inputs(*config.input_size)
    before = count_parameters_and_flops(model, inputs)
    named = dict(model.named_modules())
    unknown = [name for name in config.ignored if name not in named]
    if unknown:
        raise ValueError(f"prune.ignored names unknown modules: {unknown}")
    prune_channels(model, inputs, config.fractions, [named[n] for n in config.ignored])
    after = count_parameters_and_flops(model, inputs)
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_pruned(model, output)
    summary = {
        "sparse_run": run.out_dir, "fractions": config.fractions,
        "parameters": {"before": before[0], "after": after[0]},
        "gflops": {"before": before[1] / 1e9, "after": after[1] / 1e9,
                   "input_size": config.input_size},
        "channels": channel_config(model),
        "provenance": provenance(),
    }
    output.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"pruned {run.out_dir}: {before[0]:,} → {after[0]:,} parameters, "
          f"{before[1] / 1e9:.2f} → {after[1] / 1e9:.2f} GFLOPs at "
          f"{config.input_size[0]}×{config.input_size[1]}; saved {output}")
    return output
