"""What a generated table ran with: the kdkit commit and the torch, Triton and timm versions.

Every report and benchmark table names these (one line from :func:`provenance_line`), so a
number that moves between two runs can be traced to a code or library change.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
from pathlib import Path

__all__ = ["ENV_COMMIT", "kdkit_commit", "library_version", "provenance", "provenance_line"]

_CHECKOUT = Path(__file__).resolve().parent.parent
ENV_COMMIT = "KDKIT_COMMIT"  # the commit of a tree copied without its .git folder
_LIBRARIES = {"torch": "torch", "Triton": "triton", "timm": "timm"}


def _git(*args: str, cwd: Path) -> str | None:
    """``git <args>``'s stripped output in ``cwd``, or None when git fails or is absent."""
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def kdkit_commit(checkout: Path = _CHECKOUT) -> str:
    """The short hash of ``HEAD`` of the checkout kdkit runs from, ``+dirty`` appended when
    tracked files differ from it. Outside a git checkout (a copy of the tree sent to a lent
    GPU machine), :data:`ENV_COMMIT` as whoever sent it set it, else ``"unknown"``."""
    head = (checkout / ".git").exists() and _git("rev-parse", "--short", "HEAD", cwd=checkout)
    if not head:
        return os.environ.get(ENV_COMMIT, "").strip() or "unknown"
    changes = _git("status", "--porcelain", "--untracked-files=no", cwd=checkout)
    return f"{head}+dirty" if changes else head


def library_version(distribution: str) -> str:
    """The installed version of ``distribution``, or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def provenance() -> dict[str, str]:
    """``{"kdkit": commit, "torch": version, "Triton": version, "timm": version}``."""
    return {"kdkit": kdkit_commit(),
            **{label: library_version(name) for label, name in _LIBRARIES.items()}}


def provenance_line(found: dict[str, str] | None = None) -> str:
    """One sentence for a table's header, from ``found`` (a recorded :func:`provenance`) or
    from this process: ``kdkit abc1234+dirty; torch 2.5.1, Triton 3.1.0, timm 1.0.11.``"""
    found = provenance() if found is None else found
    libraries = ", ".join(f"{label} {version}" for label, version in found.items()
                          if label != "kdkit")
    return f"kdkit {found['kdkit']}; {libraries}."
