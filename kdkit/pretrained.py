"""Ship a finished run's weights inside a package: float16 safetensors plus a JSON record.

    python -m kdkit.pretrained RUN_DIR OUT --command "..."

writes ``OUT.safetensors`` and ``OUT.json`` (the command, the run's config and seed, its
last evaluation, training time, library versions, date). A config loads such weights as
``checkpoint: package.module:NAME.safetensors`` (see :func:`kdkit.checkpoint.resolve_path`)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from kdkit.checkpoint import load_checkpoint
from kdkit.config import load_yaml
from kdkit.train import read_log

__all__ = ["export"]


def export(run_dir: Path, out: Path, command: str) -> Path:
    """Write ``out.safetensors`` (float tensors in float16) and ``out.json`` from the
    finished run in ``run_dir``; returns the weights' path."""
    state = load_checkpoint(run_dir / "model.pt")["model"]
    tensors = {k: (v.half() if v.is_floating_point() else v).contiguous()
               for k, v in state.items()}
    target = out.with_suffix(".safetensors")
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, target)
    train = read_log(run_dir, "train")
    record = {
        "command": command,
        "config": load_yaml(run_dir / "config.yaml"),
        "final_eval": read_log(run_dir, "eval")[-1],
        "mean_ms_per_step": sum(r["ms_per_step"] for r in train) / len(train),
        "values_in_state_dict": sum(v.numel() for v in state.values()),
        "bytes": target.stat().st_size,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path, help="output path without suffix")
    parser.add_argument("--command", required=True, help="the command that trained the run")
    args = parser.parse_args()
    print(f"wrote {export(args.run_dir, args.out, args.command)}")


if __name__ == "__main__":
    main()
