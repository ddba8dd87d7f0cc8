"""The computations behind the SPKD losses, with interchangeable backends.

    reference   the materialised maps (``B×N×N`` for spatial): the definition, and the
                baseline every other backend is measured against
    factored    the Gram identity in plain PyTorch (``C×C`` instead of ``N×N``); any device
    triton      fused Triton kernels for the Grams, forward and backward (CUDA, or the
                Triton interpreter on the CPU with ``TRITON_INTERPRET=1``)

``backend="auto"`` picks ``triton`` for CUDA tensors when Triton is installed and
``factored`` otherwise; the environment variable ``KDKIT_SIMILARITY_BACKEND`` overrides that
choice. ``accumulate`` sets the precision of the Gram accumulation of ``factored`` and
``triton`` (``"fp64"`` by default; see docs/kernels.md). ``reference`` computes in the
inputs' precision (at least float32) and needs no such choice.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from kdkit.kernels import factored, reference
from kdkit.kernels.reference import (
    batch_similarity_map,
    channel_similarity_map,
    normalize_channels,
    normalize_positions,
    spatial_similarity_map,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_ACCUMULATE",
    "ENV_BACKEND",
    "describe_error",
    "resolve_backend",
    "triton_available",
    "batch_similarity",
    "spatial_similarity",
    "channel_similarity",
    "spatial_channel_similarity",
    "batch_similarity_map",
    "channel_similarity_map",
    "normalize_channels",
    "normalize_positions",
    "spatial_similarity_map",
]

BACKENDS = ("reference", "factored", "triton")
DEFAULT_ACCUMULATE = "fp64"
ENV_BACKEND = "KDKIT_SIMILARITY_BACKEND"


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here."""
    return importlib.util.find_spec("triton") is not None


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): a kernel
    or compiler failure in one line, without the pages of IR that may follow."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, tensor: torch.Tensor) -> str:
    """The concrete backend for ``backend`` (``"auto"`` or one of :data:`BACKENDS`) and
    the device of ``tensor``; raises ``ValueError`` when it cannot run there."""
    where = ""
    if backend == "auto":
        override = os.environ.get(ENV_BACKEND, "").strip()
        if override:
            backend, where = override, f" (from {ENV_BACKEND})"
        else:
            backend = "triton" if tensor.is_cuda and triton_available() else "factored"
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown similarity backend {backend!r}{where}; choose 'auto' or one of "
            f"{', '.join(BACKENDS)}"
        )
    if backend == "triton":
        if not triton_available():
            raise ValueError(
                f"the 'triton' similarity backend{where} needs the triton package, which is "
                "not installed here; use backend='factored'"
            )
        if not tensor.is_cuda and not _interpreting():
            raise ValueError(
                f"the 'triton' similarity backend{where} runs on CUDA tensors (found "
                f"{tensor.device}); set TRITON_INTERPRET=1 before importing kdkit to run its "
                "kernels in the Triton interpreter, or use backend='factored'"
            )
    return backend


def _triton():
    from kdkit.kernels import triton_similarity

    return triton_similarity


def _dispatch(loss: str, student, teacher, backend: str, accumulate: str):
    """Call ``loss`` (a function name shared by the backend modules) on ``backend``."""
    backend = resolve_backend(backend, student)
    if backend == "reference":
        return getattr(reference, loss)(student, teacher)
    module = factored if backend == "factored" else _triton()
    return getattr(module, loss)(student, teacher, accumulate)


def batch_similarity(student, teacher, backend="auto", accumulate=DEFAULT_ACCUMULATE):
    """``B×…`` twice → scalar: MSE between the row-normalised ``B×B`` batch maps."""
    return _dispatch("batch_similarity", student, teacher, backend, accumulate)


def spatial_similarity(student, teacher, backend="auto", accumulate=DEFAULT_ACCUMULATE):
    """``B×Cs×S…``, ``B×Ct×S…`` → scalar: MSE between the ``B×N×N`` spatial maps."""
    return _dispatch("spatial_similarity", student, teacher, backend, accumulate)


def channel_similarity(student, teacher, backend="auto", accumulate=DEFAULT_ACCUMULATE):
    """``B×C×S…``, ``B×C×S'…`` → scalar: MSE between the ``B×C×C`` channel maps."""
    return _dispatch("channel_similarity", student, teacher, backend, accumulate)


def spatial_channel_similarity(student, teacher, backend="auto", accumulate=DEFAULT_ACCUMULATE):
    """``B×C×S…`` twice (same C and positions) → scalar: spatial plus channel loss. The
    ``triton`` backend reads each feature map once for both."""
    backend = resolve_backend(backend, student)
    if backend == "triton":
        return _triton().spatial_channel_similarity(student, teacher, accumulate)
    return spatial_similarity(student, teacher, backend, accumulate) + channel_similarity(
        student, teacher, backend, accumulate
    )
