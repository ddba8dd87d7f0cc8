"""pytest-benchmark micro-benchmarks of the similarity backends (forward + backward).

    .venv/bin/pytest benchmarks --benchmark-enable            # CPU: reference, factored
    .venv/bin/pytest benchmarks --benchmark-enable -k triton  # on a GPU

For the full table at the papers' shapes use ``kdkit bench kernels``."""

import pytest
import torch

from kdkit import kernels
from kdkit.losses import spatial_channel_similarity_loss, spatial_similarity_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    pytest.param(backend, accumulate, id=f"{backend}-{accumulate}")
    for backend in ("reference", "factored", "triton")
    for accumulate in ("fp32", "fp64")
    if not (backend == "reference" and accumulate == "fp64")
    and not (backend == "triton" and (DEVICE != "cuda" or not kernels.triton_available()))
]


def _step(function, student, teacher, backend, accumulate):
    def run():
        loss = function(student, teacher, backend=backend, accumulate=accumulate)
        loss.backward()
        student.grad = None
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("backend, accumulate", CASES)
def test_spatial_conv3_shape(benchmark, backend, accumulate):
    """Batch 2 at the papers' conv3 (40×40 positions), student 128 → teacher 256 channels."""
    student = torch.randn(2, 128, 40, 40, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 256, 40, 40, device=DEVICE)
    benchmark(_step(spatial_similarity_loss, student, teacher, backend, accumulate))


@pytest.mark.parametrize("backend, accumulate", CASES)
def test_spatial_channel_conv3_shape(benchmark, backend, accumulate):
    """The fused spatial+channel loss on adapted conv3 features (256 channels, 40×40)."""
    student = torch.randn(2, 256, 40, 40, device=DEVICE, requires_grad=True)
    teacher = torch.randn(2, 256, 40, 40, device=DEVICE)
    benchmark(_step(spatial_channel_similarity_loss, student, teacher, backend, accumulate))
