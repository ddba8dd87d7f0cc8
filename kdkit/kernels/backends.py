"""The registry of similarity backends: name → :class:`Backend`, which knows where the
backend runs and how to call it. The dispatch (``backend="auto"`` included), the benchmark
and the command line read :data:`BACKENDS`; :func:`register_backend` adds one.

A backend is a module with ``batch_similarity``, ``spatial_similarity`` and
``channel_similarity`` (``B×C×S…`` student and teacher → scalar loss; with an
``accumulate`` argument unless :attr:`Backend.accumulates` is false), and optionally
``spatial_channel_similarity`` (both losses from one pass over the maps; without it, the
sum of the two).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from types import ModuleType

import torch

from kdkit.errors import ConfigError

__all__ = ["BACKENDS", "ENV_BACKEND", "Backend", "package_installed", "register_backend",
           "native_backends", "resolve_backend"]

ENV_BACKEND = "KDKIT_SIMILARITY_BACKEND"


def package_installed(name: str) -> bool:
    """Whether the package ``name`` can be imported here."""
    return importlib.util.find_spec(name) is not None


@dataclass(frozen=True)
class Backend:
    """One similarity backend.

    Attributes:
        name: what ``backend=`` and ``--backends`` call it.
        module: the dotted name of its module (imported on first use).
        accumulates: whether its functions take ``accumulate`` (the Gram precision).
        devices: the device types it runs on natively (``None``: any).
        requires: a package it needs (``None``: none beyond torch).
        interpreter: an environment variable that, set to ``1`` before kdkit is imported,
            lets it run on any device (slowly; ``"auto"`` never chooses that).
        auto_priority: ``"auto"`` picks, among the backends that run natively on the
            tensors' device, the one with the highest priority; 0: never picked.
    """

    name: str
    module: str
    accumulates: bool = True
    devices: tuple[str, ...] | None = None
    requires: str | None = None
    interpreter: str | None = None
    auto_priority: int = 0

    def installed(self) -> bool:
        """Whether the package it needs is importable here."""
        return self.requires is None or package_installed(self.requires)

    def runs_on(self, device_type: str) -> bool:
        """Whether it runs natively on tensors of ``device_type`` ("cpu", "cuda", …)."""
        return self.installed() and (self.devices is None or device_type in self.devices)

    def refusal(self, device_type: str) -> str | None:
        """Why it cannot run on ``device_type`` here, with what to do; None when it can."""
        if not self.installed():
            return (f"needs the {self.requires} package, which is not installed here; use "
                    "backend='factored'")
        interpreting = self.interpreter and os.environ.get(self.interpreter, "0") == "1"
        if self.runs_on(device_type) or interpreting:
            return None
        how = (f"set {self.interpreter}=1 before importing kdkit to run it in an interpreter, "
               if self.interpreter else "")
        return (f"runs on {' or '.join(d.upper() for d in self.devices)} tensors (found "
                f"{device_type}); {how}or use backend='factored'")

    def load(self) -> ModuleType:
        """Its module, imported."""
        return importlib.import_module(self.module)

    def __call__(self, loss: str, student: torch.Tensor, teacher: torch.Tensor,
                 accumulate: str) -> torch.Tensor:
        """The loss ``loss`` (a function name of the backend protocol) on this backend."""
        module = self.load()
        if loss == "spatial_channel_similarity" and not hasattr(module, loss):
            return (self("spatial_similarity", student, teacher, accumulate)
                    + self("channel_similarity", student, teacher, accumulate))
        function = getattr(module, loss)
        if self.accumulates:
            return function(student, teacher, accumulate)
        return function(student, teacher)


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS`; a name already taken by another is refused.
    Registration order is the benchmark's order (``reference`` first: the baseline)."""
    if BACKENDS.get(backend.name, backend) != backend:
        raise ValueError(f"a similarity backend named {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


register_backend(Backend("reference", "kdkit.kernels.reference", accumulates=False))
register_backend(Backend("factored", "kdkit.kernels.factored", auto_priority=1))
register_backend(Backend("triton", "kdkit.kernels.triton_similarity", devices=("cuda",),
                         requires="triton", interpreter="TRITON_INTERPRET", auto_priority=2))


def native_backends(device_type: str) -> list[str]:
    """The backends that run natively on ``device_type``, in registration order."""
    return [name for name, backend in BACKENDS.items() if backend.runs_on(device_type)]


def _auto(device_type: str) -> Backend:
    candidates = [b for b in BACKENDS.values() if b.auto_priority and b.runs_on(device_type)]
    return max(candidates, key=lambda b: b.auto_priority)


def resolve_backend(backend: str, tensor: torch.Tensor) -> Backend:
    """The backend that ``backend`` (``"auto"`` or a name in :data:`BACKENDS`) means for
    the device of ``tensor``: ``"auto"`` follows :data:`ENV_BACKEND` when set, else picks
    by :attr:`Backend.auto_priority`. A :class:`~kdkit.errors.ConfigError` when the name is
    unknown or the backend cannot run there."""
    where = ""
    if backend == "auto":
        override = os.environ.get(ENV_BACKEND, "").strip()
        if not override:
            return _auto(tensor.device.type)
        backend, where = override, f" (from {ENV_BACKEND})"
    if backend not in BACKENDS:
        raise ConfigError(
            f"unknown similarity backend {backend!r}{where}; choose 'auto' or one of "
            f"{', '.join(BACKENDS)}")
    chosen = BACKENDS[backend]
    refusal = chosen.refusal(tensor.device.type)
    if refusal:
        raise ConfigError(f"the {backend!r} similarity backend{where} {refusal}")
    return chosen
