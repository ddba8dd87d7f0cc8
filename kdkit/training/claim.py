"""A run folder claimed by the one process that trains it.

``<run folder>/.claim`` carries an exclusive ``flock`` for as long as a process trains the
run, and says who: host, pid and start time. The lock is taken atomically by the kernel
and released when the process ends, however it ends (SIGKILL and a lost node included; on
NFS the server releases a dead client's locks), so:

- a second process that would train the same run finds the lock held and is refused with
  a :class:`~kdkit.errors.RunFolderError` naming the holder;
- a claim left by a process that died is not locked: the next process takes it over (and
  says whose it was);
- a process that ends the block (normally, with an error or stopped by a signal) empties
  the file before it lets go, so only a process that died leaves a record behind.

The file is never deleted (deleting a lock file lets two processes lock two different
files). Without ``fcntl`` (Windows) folders are not claimed.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from kdkit.errors import RunFolderError

__all__ = ["CLAIM", "claim", "describe"]

CLAIM = ".claim"


def describe(record: dict) -> str:
    """``"pid 123 on host node7 (since 2026-11-30 21:03:05)"``."""
    return f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('since')})"


def _read(fd: int) -> dict | None:
    """The claim record in the file ``fd``, ``None`` when it is empty or unreadable."""
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else None
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "since": f"unreadable claim {text[:40]!r}"}


def _write(fd: int, record: dict | None) -> None:
    """Replace the file's content with ``record`` (nothing for ``None``), flushed."""
    os.ftruncate(fd, 0)
    if record is not None:
        os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


@contextmanager
def claim(folder: Path) -> Iterator[dict | None]:
    """Hold ``folder``'s claim for the block (the folder must exist); yields the record of
    a dead process's claim that was taken over, else ``None``. A claim held by a live
    process is a :class:`RunFolderError`."""
    try:
        import fcntl
    except ImportError:  # no flock: nothing to hold
        yield None
        return
    fd = os.open(folder / CLAIM, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd) or {}
            raise RunFolderError(
                f"{folder} is being trained by {describe(holder)}: two processes never train "
                "one run. Wait for it to finish or stop it (the same command then resumes "
                "the run), or choose another out_dir") from None
        stale = _read(fd)
        _write(fd, {"host": socket.gethostname(), "pid": os.getpid(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            yield stale
        finally:
            _write(fd, None)  # an end in this process (an error or a stop too): no record
    finally:
        os.close(fd)  # lets go of the lock (the kernel does it too if the process dies)
