"""The computations behind the SPKD losses, with interchangeable backends.

    reference   the materialised maps (``B×N×N`` for spatial): the definition, and the
                baseline every other backend is measured against
    factored    the Gram identity in plain PyTorch (``C×C`` instead of ``N×N``); any device
    triton      fused Triton kernels for the Grams, forward and backward (CUDA, or the
                Triton interpreter on the CPU with ``TRITON_INTERPRET=1``)

The backends are registered in :data:`BACKENDS` (:mod:`kdkit.kernels.backends`: where each
runs, how to call it); :mod:`kdkit.kernels.common` holds the precision rules and Gram
identities they share. ``backend="auto"`` picks ``triton`` for CUDA tensors when Triton is
installed and ``factored`` otherwise; the environment variable ``KDKIT_SIMILARITY_BACKEND``
overrides that choice. ``accumulate`` sets the precision of ``factored`` and ``triton``:
``"auto"`` by default (float64 only where a Gram identity cancels), ``"fp32"`` or ``"fp64"``
everywhere (see docs/kernels.md). ``reference``
computes in the inputs' precision (at least float32) and needs no such choice.
"""

from __future__ import annotations

import torch

from kdkit.kernels.backends import (
    BACKENDS,
    ENV_BACKEND,
    Backend,
    native_backends,
    register_backend,
    resolve_backend,
)
from kdkit.kernels.common import DEFAULT_ACCUMULATE
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
    "Backend",
    "describe_error",
    "native_backends",
    "register_backend",
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

def triton_available() -> bool:
    """Whether the ``triton`` backend's package can be imported here."""
    return BACKENDS["triton"].installed()


def describe_error(error: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (at most ``limit`` characters of it): a kernel
    or compiler failure in one line, without the pages of IR that may follow."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:limit] if lines else ''}"


def _dispatch(loss: str, student: torch.Tensor, teacher: torch.Tensor, backend: str,
              accumulate: str) -> torch.Tensor:
    """Call ``loss`` (a function name of the backend protocol) on ``backend``."""
    return resolve_backend(backend, student)(loss, student, teacher, accumulate)


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
    return _dispatch("spatial_channel_similarity", student, teacher, backend, accumulate)
