"""The errors kdkit raises for inputs a user can fix.

Each message says what was expected, what was found and what to do. The command line
prints a :class:`KdkitError` as one line and exits non-zero (``--debug`` shows the
traceback); anything else is a bug and keeps its traceback. The subclasses also derive
from the built-in type that code catching them before this module existed expects.
"""

from __future__ import annotations

__all__ = [
    "KdkitError",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "FeatureError",
    "Interrupted",
    "KernelFailure",
    "MissingFileError",
    "NonFiniteLossError",
    "PlanError",
    "RunFolderError",
    "StaleRunError",
]


class KdkitError(Exception):
    """A failure the user can fix; its message is the whole explanation."""


class ConfigError(KdkitError, ValueError):
    """A config that does not match its schema or its ranges; the message says where."""


class DataError(KdkitError, ValueError):
    """A dataset, file or sample that cannot be used as it is."""


class MissingFileError(DataError, FileNotFoundError):
    """A data file or folder that does not exist (a :class:`FileNotFoundError` too)."""


class CheckpointError(KdkitError, ValueError):
    """A checkpoint or weights file that is missing, corrupt, unsafe or does not fit."""


class RunFolderError(KdkitError):
    """A run folder that holds another run (a different config, a finished run)."""


class StaleRunError(RunFolderError):
    """A run folder whose run this config may not resume: its config differs in what a
    resumed run may not change, or cannot be read. ``problem`` says which; ``advice`` what
    to do, in the words of the command that met it (``kdkit compare`` rewords it)."""

    def __init__(self, problem: str, advice: str):
        super().__init__(problem, advice)  # both in args: the error pickles and unpickles
        self.problem, self.advice = problem, advice

    def __str__(self) -> str:
        return f"{self.problem}; {self.advice}"


class PlanError(KdkitError):
    """An entry of a comparison's plan that cannot run: an index out of range, an entry
    whose dependencies have not finished, or a plan asked of a comparison with a budget."""


class FeatureError(KdkitError, RuntimeError):
    """A recorded feature that cannot be used: its module did not run, ran fewer times
    than the reference asks, produced no tensor, or was overwritten in place."""


class NonFiniteLossError(KdkitError, FloatingPointError):
    """A loss or feature became NaN or infinite; the message names it and what to do."""


class KernelFailure(KdkitError, RuntimeError):
    """A Triton similarity kernel failed to compile or run; the message says what to use."""


class Interrupted(KdkitError):
    """Training stopped on a signal (SIGTERM, SIGINT, SIGUSR1) after finishing its step and
    saving a checkpoint: nothing is lost, and the same command resumes. ``signal``: the
    signal's number; the command line exits with ``128 + signal`` (143 for SIGTERM, 130 for
    SIGINT, 138 for SIGUSR1), as a shell reports a process the signal ended."""

    def __init__(self, message: str, signal: int):
        super().__init__(message)
        self.signal = signal
