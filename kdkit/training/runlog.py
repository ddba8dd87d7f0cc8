"""The run's log: records (``kind: train``, ``eval``, ``skip``) fanned out to sinks.

``train.log`` names the sinks: ``jsonl`` appends each record to ``log.jsonl`` (what
:func:`read_log`, the comparison and the reports read); ``tensorboard`` writes each record's
numbers as TensorBoard scalars (``train/total``, ``train/lr``, ``eval/<metric>`` …) to
``tensorboard/``. Opened at a resumed run's step, each sink first drops what an interrupted
run logged after that step, so the log holds each step once.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

from kdkit.errors import KdkitError

__all__ = ["LOG", "LOG_SINKS", "TENSORBOARD", "JsonlSink", "Pace", "RunLog",
           "TensorBoardSink", "open_run_log", "read_log", "remove_logs", "tensorboard_writer"]

LOG = "log.jsonl"
TENSORBOARD = "tensorboard"


def read_log(run_dir: str | Path | None, kind: str) -> list[dict]:
    """The ``kind`` ("train", "eval" or "skip") records of a run's ``log.jsonl``, in order;
    none when the run has no log."""
    path = None if run_dir is None else Path(run_dir) / LOG
    if path is None or not path.exists():
        return []
    records = map(json.loads, path.read_text(encoding="utf-8").splitlines())
    return [record for record in records if record.get("kind") == kind]


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line in ``folder/log.jsonl``."""

    def __init__(self, folder: Path, step: int):
        self.path = folder / LOG
        if self.path.exists():
            records = map(json.loads, self.path.read_text(encoding="utf-8").splitlines())
            kept = [json.dumps(r) + "\n" for r in records if r["step"] <= step]
            self.path.write_text("".join(kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass


def tensorboard_writer(folder: Path, **kwargs):
    """A ``SummaryWriter`` for ``folder/tensorboard/``; a :class:`KdkitError` saying what to
    install when the ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise KdkitError('train.log asks for tensorboard, which is not installed: '
                         'pip install "kdkit[tensorboard]"') from None
    return SummaryWriter(str(folder / TENSORBOARD), **kwargs)


class TensorBoardSink:
    """Each record's numbers as scalars ``<kind>/<name>`` at its step, in
    ``folder/tensorboard/``."""

    def __init__(self, folder: Path, step: int):
        self.writer = tensorboard_writer(folder, purge_step=step + 1)

    def write(self, record: dict[str, Any]) -> None:
        for name, value in record.items():
            if name not in ("kind", "step") and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                self.writer.add_scalar(f"{record['kind']}/{name}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


#: ``train.log`` names → sink classes (constructed with the run folder and the start step).
LOG_SINKS: dict[str, type] = {"jsonl": JsonlSink, "tensorboard": TensorBoardSink}


class RunLog:
    """Writes each record to every sink; a context manager that closes them."""

    def __init__(self, sinks: list[Sink]):
        self.sinks = sinks

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_run_log(folder: Path, names: list[str], step: int, writes: bool) -> RunLog:
    """The log of the run in ``folder`` resumed at ``step``, to the sinks ``names`` (see
    :data:`LOG_SINKS`); without sinks where this process does not write (``writes``
    false: ranks other than 0)."""
    return RunLog([LOG_SINKS[name](folder, step) for name in names] if writes else [])


def remove_logs(folder: Path) -> None:
    """Delete every sink's files in ``folder`` (starting over)."""
    (folder / LOG).unlink(missing_ok=True)
    shutil.rmtree(folder / TENSORBOARD, ignore_errors=True)


class Pace:
    """Milliseconds per step between laps: :meth:`lap` at a step divides the time since the
    previous lap by the steps taken since it (skipped ones too), whatever the log interval
    (the first after a resume, the last, one with skipped steps)."""

    clock = staticmethod(time.perf_counter)

    def __init__(self, step: int):
        self.step, self.started = step, self.clock()

    def lap(self, step: int) -> float:
        """The pace since the previous lap (``step`` is past it), in ms per step."""
        now = self.clock()
        ms = 1e3 * (now - self.started) / (step - self.step)
        self.step, self.started = step, now
        return ms
