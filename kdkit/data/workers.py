"""How many processes load data: ``train.num_workers`` as an int or ``"auto"``.

``"auto"`` is the cores this process may run on minus one (the main process trains and
collates), and at least 0: a one-core machine loads in the main process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from kdkit.errors import ConfigError

__all__ = ["AUTO", "NumWorkers", "resolve_num_workers", "usable_cores"]

AUTO = "auto"


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS reports it, else
    ``os.cpu_count()``), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_num_workers(value: int | str) -> int:
    """DataLoader workers for ``train.num_workers``: an int ≥ 0 as it is; ``"auto"``:
    :func:`usable_cores` minus one, at least 0."""
    if value == AUTO:
        return max(0, usable_cores() - 1)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ConfigError(NumWorkers().problem("train.num_workers", value))


@dataclass(frozen=True)
class NumWorkers:
    """A :data:`kdkit.config.FIELD_CHECKS` check: an int ≥ 0 or ``"auto"``."""

    def allows(self, value: Any) -> bool:
        return value == AUTO or (isinstance(value, int) and not isinstance(value, bool)
                                 and value >= 0)

    def problem(self, key: str, value: Any) -> str:
        return (f"{key}: expected an integer >= 0 or 'auto' (the machine's cores minus one), "
                f"found {value!r}; set {key} to 0 (load in the main process), a number of "
                "worker processes, or auto")
