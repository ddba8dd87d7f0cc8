"""The run folder: its files, whether a config may resume it, starting over, its claim by
the one process training it, and no half-made folder after a failure.

A folder holds a resumable run when it has ``checkpoint.pt``. Running a config into it
resumes only when the config equals the folder's ``config.yaml`` except for
:data:`SAFE_TO_CHANGE` (how often to log, checkpoint and evaluate, loader workers, device,
log sinks, the folder's own path) and, with the constant schedule, ``train.steps`` (to any
step at or past the checkpoint's): every other key changes what the steps already taken
would have been. With ``schedule: cosine``, ``steps`` sets the learning rate of every step,
so it may not change. Anything else is a :class:`~kdkit.errors.RunFolderError` that lists
the keys (old → new) and says how to start over. Without a checkpoint (or with
``resume=False``) the run starts over: the folder's checkpoint, weights and logs are
deleted first, other files are left alone.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
import yaml

from kdkit.checkpoint import load_checkpoint
from kdkit.config import ConfigError, RunConfig, load_yaml, run_config_from_mapping
from kdkit.errors import StaleRunError
from kdkit.training.claim import claim, describe
from kdkit.training.runlog import remove_logs

__all__ = ["CHECKPOINT", "CONFIG", "SAFE_TO_CHANGE", "WEIGHTS", "RunFolder", "config_changes",
           "resume_problems"]

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.pt"
CONFIG = "config.yaml"
ABSENT = "<absent>"  # a key one of two compared configs lacks

#: Config keys (and everything under them) that a resumed run may change: they change
#: neither the steps taken so far nor the steps to come.
SAFE_TO_CHANGE = ("out_dir", "train.log_every", "train.checkpoint_every", "train.eval_every",
                  "train.num_workers", "train.device", "train.log")

START_OVER = ("start over with `kdkit train … --no-resume` (or `train(..., resume=False)`; "
              "it deletes the folder's checkpoint, weights and log), or choose another out_dir")


def _flat(value: Any, key: str = "") -> dict[str, Any]:
    """``{key path: leaf}`` of a nested config (``train.lr``, ``distillation[1].weight``)."""
    if isinstance(value, dict):
        return {k: v for name, item in value.items()
                for k, v in _flat(item, f"{key}.{name}" if key else str(name)).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value)
                for k, v in _flat(item, f"{key}[{i}]").items()}
    return {key: value}


def config_changes(old: RunConfig, new: RunConfig) -> dict[str, tuple[Any, Any]]:
    """``{key path: (old, new)}`` for every leaf that differs between two configs."""
    before, after = _flat(old.to_dict()), _flat(new.to_dict())
    return {key: (before.get(key, ABSENT), after.get(key, ABSENT))
            for key in sorted(before.keys() | after.keys())
            if before.get(key, ABSENT) != after.get(key, ABSENT)}


def _safe(key: str) -> bool:
    return any(key == safe or key.startswith((f"{safe}.", f"{safe}["))
               for safe in SAFE_TO_CHANGE)


def _steps_problem(new: RunConfig, checkpoint_step: int) -> str | None:
    """Why ``train.steps`` may not change to ``new``'s, or ``None`` when it may."""
    if new.train.schedule != "constant":
        return (f"with schedule: {new.train.schedule} the steps set every step's learning "
                "rate; only the constant schedule may change them")
    if new.train.steps < checkpoint_step:
        return f"the checkpoint is at step {checkpoint_step}, past the new steps"
    return None


def resume_problems(old: RunConfig, new: RunConfig, checkpoint_step: int) -> list[str]:
    """Each change from ``old`` to ``new`` that a run resumed at ``checkpoint_step`` may
    not make, as ``key: old → new (why)``."""
    problems = []
    for key, (before, after) in config_changes(old, new).items():
        change = f"{key}: {before!r} → {after!r}"
        if key == "train.steps":
            why = _steps_problem(new, checkpoint_step)
            problems += [f"{change} ({why})"] if why else []
        elif not _safe(key):
            problems.append(change)
    return problems


class RunFolder:
    """``out_dir`` of a run: its files, and (on the writing process, ``writes``) what is
    created and deleted in it."""

    def __init__(self, path: Path, writes: bool):
        self.path, self.writes = path, writes
        self.checkpoint, self.weights = path / CHECKPOINT, path / WEIGHTS
        self.config = path / CONFIG

    def saved_config(self) -> RunConfig | None:
        """The folder's ``config.yaml``, ``None`` when it has none."""
        if not self.config.exists():
            return None
        try:
            return run_config_from_mapping(load_yaml(self.config), str(self.config))
        except ConfigError as error:
            raise StaleRunError(f"{self.path} holds a run whose {CONFIG} this kdkit cannot "
                                f"read ({error})", START_OVER) from None

    def resume_state(self, config: RunConfig, resume: bool,
                     device: torch.device) -> dict[str, Any] | None:
        """The checkpoint to resume from when ``resume`` and the folder has one and its
        config allows (else :class:`RunFolderError`); ``None`` after starting over."""
        if not (resume and self.checkpoint.exists()):
            self.start_over()
            return None
        state = load_checkpoint(self.checkpoint, device)
        saved = self.saved_config()
        problems = [] if saved is None else resume_problems(saved, config, int(state["step"]))
        if problems:
            raise StaleRunError(
                f"{self.path} holds a run (checkpoint at step {int(state['step'])}) whose "
                f"config differs in what a resumed run may not change: {'; '.join(problems)}",
                f"resume it with its own config ({self.config}), or {START_OVER}")
        return state

    def start_over(self) -> None:
        """Delete the folder's checkpoint, weights and logs (not other files)."""
        if self.writes:
            for path in (self.checkpoint, self.weights):
                path.unlink(missing_ok=True)
            remove_logs(self.path)

    def write_config(self, config: RunConfig) -> None:
        """Write ``config`` as the folder's ``config.yaml``."""
        if self.writes:
            self.config.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

    @contextmanager
    def claimed(self) -> Iterator[None]:
        """Create the folder and hold its claim for the block (:mod:`kdkit.training.claim`:
        a folder another live process trains is a :class:`RunFolderError`); if the block
        fails before any checkpoint was written into a folder it created, remove the folder
        again."""
        created = self.writes and not self.path.exists()
        if self.writes:
            self.path.mkdir(parents=True, exist_ok=True)
        with claim(self.path) if self.writes else nullcontext() as stale:
            if stale:
                print(f"{self.path}: taking over the claim of {describe(stale)}, which "
                      "ended without letting go (it was killed or its node was lost)",
                      file=sys.stderr)
            try:
                yield
            except BaseException:
                if created and not self.checkpoint.exists():
                    shutil.rmtree(self.path, ignore_errors=True)
                raise
