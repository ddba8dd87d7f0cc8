"""Pair-wise and cross-image affinity distillation against float64 materialised maps written
from the definitions (Liu et al.; the cross-image map over all positions of the batch), on
every backend, with all-zero positions and channels, the authors' pooling, and the global
batch of a two-process world."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdkit import kernels
from kdkit.errors import ConfigError
from kdkit.losses import build_loss, cross_image_affinity_loss, pairwise_affinity_loss

BACKENDS = ["reference", "factored"] + (["triton"] if kernels.triton_available() else [])
EPS = 1e-7  # the convention: a_ij = f_i·f_j / ((‖f_i‖ + ε)(‖f_j‖ + ε))


def affinity(x: torch.Tensor) -> torch.Tensor:
    """``P×C`` positions → ``P×P`` cosine affinities, in float64."""
    x = x.double()
    unit = x / (torch.linalg.vector_norm(x, dim=1, keepdim=True) + EPS)
    return unit @ unit.T


def positions(f: torch.Tensor, b: int) -> torch.Tensor:
    """Image ``b`` of ``B×C×H×W`` → its ``N×C`` positions."""
    return f[b].reshape(f.shape[1], -1).T


def paper_pairwise(s, t):
    """Σ_ij (a^s_ij − a^t_ij)² / N², averaged over the images."""
    per_image = [(affinity(positions(s, b)) - affinity(positions(t, b))).square().sum()
                 / positions(s, b).shape[0] ** 2 for b in range(s.shape[0])]
    return torch.stack(per_image).mean()


def paper_cross_image(s, t):
    """Σ_ij (a^s_ij − a^t_ij)² / (B·N)² over all positions of all images."""
    all_s = torch.cat([positions(s, b) for b in range(s.shape[0])])
    all_t = torch.cat([positions(t, b) for b in range(t.shape[0])])
    return (affinity(all_s) - affinity(all_t)).square().sum() / all_s.shape[0] ** 2


def hand_pooled(f, kernel):
    """Max over ``kernel`` blocks, the last block of each side cut short (ceil mode)."""
    kh, kw = kernel
    rows = [torch.stack([f[:, :, i:i + kh, j:j + kw].amax(dim=(2, 3))
                         for j in range(0, f.shape[3], kw)], dim=-1)
            for i in range(0, f.shape[2], kh)]
    return torch.stack(rows, dim=-2)


def features(dtype=torch.float64, seed=0, batch=3):
    """Student ``B×5×5×9`` and teacher ``B×7×5×9`` with all-zero positions (one in the student
    only, one in the teacher only, one in both) and an all-zero channel in each."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(batch, 5, 5, 9, generator=g, dtype=torch.float64)
    t = torch.randn(batch, 7, 5, 9, generator=g, dtype=torch.float64)
    s[0, :, 1, 2] = 0
    t[1, :, 3, 4] = 0
    s[-1, :, 4, 8] = t[-1, :, 4, 8] = 0
    s[:, 2] = 0
    t[:, 4] = 0
    return s.to(dtype), t.to(dtype)


def value_and_grad(function, s, t, **kwargs):
    s = s.detach().clone().requires_grad_()
    loss = function(s, t, **kwargs)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


def assert_matches(got, want):
    """Value and gradient to 1e-6 relative (the gradient to 1e-6 of its largest entry)."""
    (loss, grad), (want_loss, want_grad) = got, want
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6,
                               atol=1e-6 * want_grad.abs().max().item())


@pytest.mark.parametrize("accumulate", ["auto", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_pairwise_affinity_is_the_paper_definition(backend, accumulate):
    s, t = features()
    want = value_and_grad(paper_pairwise, s, t)
    assert want[1][0, :, 1, 2].abs().sum() > 0  # a zero position still gets a gradient
    assert_matches(value_and_grad(pairwise_affinity_loss, s, t, backend=backend,
                                  accumulate=accumulate), want)


@pytest.mark.parametrize("accumulate", ["auto", "fp64"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_image_affinity_is_the_materialised_batch_map(backend, accumulate):
    s, t = features()
    want = value_and_grad(paper_cross_image, s, t)
    assert not torch.isclose(want[0], paper_pairwise(s, t))  # the cross-image pairs count
    assert_matches(value_and_grad(cross_image_affinity_loss, s, t, backend=backend,
                                  accumulate=accumulate), want)


def test_zero_positions_have_zero_affinity():
    s = torch.randn(1, 5, 5, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = s.clone()
    t[0, :, 2, 2] = 0  # the teacher loses one position: its row and column of affinities are 0
    unit = positions(s, 0) / positions(s, 0).norm(dim=1, keepdim=True)
    a = unit @ unit.T
    row = a[2 * 9 + 2]
    want = (2 * row.square().sum() - row[2 * 9 + 2] ** 2) / 45**2
    torch.testing.assert_close(pairwise_affinity_loss(s, t, backend="factored"), want,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["reference", "factored"])
def test_float32_features_by_default(backend):
    s, t = features(torch.float32)
    want = value_and_grad(paper_pairwise, s.double(), t.double())
    loss, grad = value_and_grad(pairwise_affinity_loss, s, t, backend=backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(grad.double(), want[1], rtol=1e-4,
                               atol=1e-5 * want[1].abs().max().item())


@pytest.mark.parametrize("backend", ["reference", "factored"])
def test_authors_pooling(backend):
    s, t = features()
    # 5×9 at scale 0.5: kernel = stride = (int(2.5), int(4.5)) = (2, 4), ceil mode → 3×3
    pooled = hand_pooled(s, (2, 4)), hand_pooled(t, (2, 4))
    assert pooled[0].shape[2:] == (3, 3)
    want = value_and_grad(lambda a, b: paper_pairwise(hand_pooled(a, (2, 4)), pooled[1]), s, t)
    assert_matches(value_and_grad(pairwise_affinity_loss, s, t, pool=0.5, backend=backend), want)
    cross = value_and_grad(lambda a, b: paper_cross_image(hand_pooled(a, (2, 4)), pooled[1]), s, t)
    assert_matches(value_and_grad(cross_image_affinity_loss, s, t, pool=0.5, backend=backend),
                   cross)


def test_registered_with_their_options():
    s, t = features()
    pooled = build_loss("pairwise_affinity", pool=0.5, backend="factored")
    assert torch.isclose(pooled(s, t), pairwise_affinity_loss(s, t, pool=0.5))
    assert "pool=0.5" in repr(pooled)
    cross = build_loss("cross_image_affinity", gather=True)
    assert torch.isclose(cross(s, t), paper_cross_image(s, t))  # no process group: local batch


def test_shape_and_option_errors():
    s, t = features()
    with pytest.raises(ConfigError, match="spatial size"):
        pairwise_affinity_loss(s, t[:, :, :4])
    with pytest.raises(ConfigError, match="batch size"):
        cross_image_affinity_loss(s, t[:2])
    with pytest.raises(ConfigError, match="scale in"):
        pairwise_affinity_loss(s, t, pool=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gathered_rank(rank, world, port, s, t, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        half = s.shape[0] // world
        mine = s[rank * half:(rank + 1) * half].clone().requires_grad_()
        loss = cross_image_affinity_loss(mine, t[rank * half:(rank + 1) * half], gather=True,
                                         backend="factored")
        loss.backward()
        out[rank] = (loss.detach(), mine.grad)
    finally:
        dist.destroy_process_group()


def test_gathered_over_a_two_process_world():
    s, t = features(batch=4)
    want_loss, want_grad = value_and_grad(paper_cross_image, s, t)
    out = mp.Manager().dict()
    mp.spawn(_gathered_rank, args=(2, _free_port(), s, t, out), nprocs=2)
    for rank in range(2):
        loss, grad = out[rank]
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)  # the global map
        # all_gather's backward sums every process's (identical) loss: 2× this rank's part,
        # which the data-parallel average over the 2 processes brings back to 1×
        torch.testing.assert_close(grad, 2 * want_grad[2 * rank:2 * rank + 2], rtol=1e-6,
                                   atol=1e-6 * want_grad.abs().max().item())
