"""FitNets, CWD, DIST and MGD against independent float64 implementations written from
the definitions in docs/methods.md (explicit loops over samples, channels and kernel taps),
value and gradient, on odd shapes with all-zero positions, channels and samples; and
MGD's masks drawn from the run's random stream, so a resumed run is identical."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import tensor
from toy_task import ToyNet, ToyTask

from kdkit import losses as L
from kdkit.checkpoint import load_checkpoint, save_atomic
from kdkit.config import run_config_from_mapping
from kdkit.distiller import Distiller, DistillTerm
from kdkit.errors import ConfigError
from kdkit.train import train
from kdkit.training.randomness import RandomStream

# --- independent references (float64, explicit loops) ------------------------------------


def ref_fitnet(s, t):
    d = (s - t).flatten()
    return sum(d[i] ** 2 for i in range(d.numel())) / d.numel()


def ref_cwd(s, t, tau):
    b, c = s.shape[:2]
    total = 0
    for i in range(b):
        for k in range(c):
            es, et = torch.exp(s[i, k].flatten() / tau), torch.exp(t[i, k].flatten() / tau)
            ps, pt = es / es.sum(), et / et.sum()
            total = total + (pt * (torch.log(pt) - torch.log(ps))).sum()
    return total / (b * c) * tau**2


def ref_pearson(x, y):
    """The norm's gradient at a constant row is taken as 0 (torch's subgradient; a square
    root of the sum of squares would give NaN there)."""
    dx, dy = x - x.mean(), y - y.mean()
    return (dx * dy).sum() / (torch.linalg.vector_norm(dx) * torch.linalg.vector_norm(dy)
                              + 1e-8)


def ref_dist(zs, zt, tau, beta, gamma):
    def samples(z):  # one probability row per sample (per pixel for dense logits)
        rows = []
        if z.dim() == 2:
            pixels = [z[i] for i in range(z.shape[0])]
        else:
            pixels = [z[i, :, h, w] for i in range(z.shape[0])
                      for h in range(z.shape[2]) for w in range(z.shape[3])]
        for v in pixels:
            e = torch.exp(v / tau)
            rows.append(e / e.sum())
        return torch.stack(rows)

    ys, yt = samples(zs), samples(zt)
    inter = 1 - sum(ref_pearson(ys[r], yt[r]) for r in range(ys.shape[0])) / ys.shape[0]
    intra = 1 - sum(ref_pearson(ys[:, k], yt[:, k]) for k in range(ys.shape[1])) / ys.shape[1]
    return tau**2 * (beta * inter + gamma * intra)


def ref_conv3x3(x, weight, bias):
    """A 3×3 convolution, padding 1, one kernel tap at a time."""
    b, _, h, w = x.shape
    padded = torch.zeros(b, x.shape[1], h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = bias.view(1, -1, 1, 1).expand(b, -1, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy:dy + h, dx:dx + w]
            out = out + torch.einsum("oi,bihw->bohw", weight[:, :, dy, dx], window)
    return out


def ref_mgd(s, t, generator, mask, alpha):
    first, _, second = generator
    hidden = ref_conv3x3(s * mask, first.weight, first.bias).clamp(min=0)
    rebuilt = ref_conv3x3(hidden, second.weight, second.bias)
    return alpha * ((rebuilt - t) ** 2).sum() / s.shape[0]


def with_zeros(f):
    """Zero one position (all channels), one channel (all positions) and one sample."""
    f = f.detach().clone()
    f[0, :, 0, 0] = 0
    f[0, 1] = 0
    f[2] = 0
    return f


def assert_value_and_gradient(loss, reference, s, *rest, params=()):
    """``loss`` and ``reference`` agree to 1e-6 relative in value and in the gradient with
    respect to ``s`` and ``params``."""
    s = s.detach().clone().requires_grad_(True)
    inputs = (s, *params)
    got = loss(s, *rest)
    expected = reference(s, *rest)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    got_grads = torch.autograd.grad(got, inputs)
    expected_grads = torch.autograd.grad(expected, inputs)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-12)


SHAPE = (3, 5, 7, 9)  # odd everywhere; three samples so one can be all zeros


@pytest.mark.parametrize("zeros", [False, True])
def test_fitnet_matches_reference(zeros):
    s, t = tensor(SHAPE, 1), tensor(SHAPE, 2)
    if zeros:
        s, t = with_zeros(s), with_zeros(t)
    assert_value_and_gradient(L.fitnet_loss, ref_fitnet, s, t)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_reference(tau, zeros):
    s, t = tensor(SHAPE, 3, scale=2.0), tensor(SHAPE, 4, scale=2.0)
    if zeros:
        s, t = with_zeros(s), with_zeros(t)
    assert_value_and_gradient(lambda a, b: L.cwd_loss(a, b, tau),
                              lambda a, b: ref_cwd(a, b, tau), s, t)


def test_cwd_of_a_constant_channel_is_uniform_and_equal_maps_give_zero():
    """An all-zero (constant) channel is the uniform distribution over positions: against a
    uniform teacher channel it costs nothing, and a feature against itself costs 0."""
    s = tensor(SHAPE, 5)
    assert L.cwd_loss(s, s).item() == pytest.approx(0.0, abs=1e-12)
    zero = torch.zeros(1, 1, 3, 5, dtype=torch.float64)
    assert L.cwd_loss(zero, zero + 7.0).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(7, 5), (3, 5, 7, 9)])
@pytest.mark.parametrize("tau, beta, gamma", [(1.0, 1.0, 1.0), (4.0, 2.0, 0.5)])
def test_dist_matches_reference(shape, tau, beta, gamma):
    zs, zt = tensor(shape, 6, scale=3.0), tensor(shape, 7, scale=3.0)
    assert_value_and_gradient(lambda a, b: L.dist_loss(a, b, tau, beta, gamma),
                              lambda a, b: ref_dist(a, b, tau, beta, gamma), zs, zt)


def test_dist_with_zero_logits_matches_reference():
    """All-zero logits at a pixel (and a whole zero image) give the uniform distribution:
    a constant row, whose Pearson correlation is 0 (the 1e-8 keeps it finite)."""
    zs, zt = with_zeros(tensor(SHAPE, 8, scale=3.0)), with_zeros(tensor(SHAPE, 9, scale=3.0))
    assert_value_and_gradient(lambda a, b: L.dist_loss(a, b, 2.0),
                              lambda a, b: ref_dist(a, b, 2.0, 1.0, 1.0), zs, zt)


def test_dist_a_constant_pixel_adds_one_over_the_pixels_to_inter():
    z = tensor((2, 4, 3, 5), 10, scale=3.0)
    z[0, :, 1, 2] = 0.5
    inter = L.dist_loss(z, z, beta=1.0, gamma=0.0).item()
    assert inter == pytest.approx(1 / 30, rel=1e-5)  # 30 pixels, one uncorrelated (+ 1e-8s)
    assert L.dist_loss(z, z, beta=0.0, gamma=1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_dist_refuses_a_single_channel_and_says_why():
    alpha = torch.zeros(2, 1, 5, 5)
    with pytest.raises(ConfigError, match="K = 1.*matting"):
        L.dist_loss(alpha, alpha)
    with pytest.raises(ConfigError, match="logit shape"):
        L.dist_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, 4))


@pytest.mark.parametrize("zeros", [False, True])
def test_mgd_matches_reference(zeros):
    s, t = tensor(SHAPE, 11), tensor(SHAPE, 12)
    if zeros:
        s, t = with_zeros(s), with_zeros(t)
    torch.manual_seed(0)
    generator = L.mgd_generator(SHAPE[1]).double()
    mask = (torch.rand(SHAPE[0], 1, *SHAPE[2:]) > 0.5).double()
    assert_value_and_gradient(
        lambda a, b: L.mgd_loss(a, b, generator, mask, alpha=3e-3),
        lambda a, b: ref_mgd(a, b, generator, mask, 3e-3), s, t,
        params=tuple(generator.parameters()))


def test_mgd_mask_drops_pixels_where_the_draw_exceeds_one_minus_the_ratio():
    f = torch.zeros(4, 3, 15, 17)
    torch.manual_seed(5)
    mask = L.mgd_mask(f, 0.75)
    torch.manual_seed(5)
    u = torch.rand(4, 1, 15, 17)
    assert mask.shape == (4, 1, 15, 17) and mask.dtype == f.dtype
    assert torch.equal(mask, (u <= 0.25).float())  # the official code: 0 where u > 1 − λ
    assert 0.15 < mask.mean().item() < 0.35
    assert L.mgd_mask(f, 0.0).min() == 1 and L.mgd_mask(f, 1.0).max() == 0


def test_mgd_masks_follow_the_run_random_stream():
    """Two runs seeded alike draw the same masks; the stream advances between steps and
    the global generator outside the run is left alone."""
    f = torch.zeros(2, 3, 5, 7)

    def masks(seed):
        stream = RandomStream.seeded(seed, 0, torch.device("cpu"))
        drawn = []
        for _ in range(2):
            with stream.active():
                drawn.append(L.mgd_mask(f, 0.5))
        return drawn

    outer = torch.get_rng_state()
    first, again, other = masks(3), masks(3), masks(4)
    assert torch.equal(torch.get_rng_state(), outer)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], other[0])


def test_mgd_module_draws_its_mask_and_sizes_its_generator():
    s, t = tensor((2, 3, 5, 5), 13), tensor((2, 3, 5, 5), 14)
    loss = L.build_loss("mgd", alpha=1.0, ratio=0.5)
    with pytest.raises(ConfigError, match="example_inputs"):
        loss(s, t)  # first call with gradients: the optimizer would miss the generator
    with torch.no_grad():
        loss(s, t)
    assert loss.generation[0].in_channels == 3 and loss.generation[0].weight.dtype == s.dtype
    torch.manual_seed(1)
    got = loss(s, t)
    torch.manual_seed(1)
    mask = L.mgd_mask(s, 0.5)
    assert got.item() == L.mgd_loss(s, t, loss.generation, mask, 1.0).item()
    with pytest.raises(ConfigError, match="built for 3 channels"):
        loss(tensor((2, 4, 5, 5), 15), tensor((2, 4, 5, 5), 16))
    assert L.MGDLoss(channels=6).generation[2].out_channels == 6
    with pytest.raises(ConfigError, match="ratio"):
        L.MGDLoss(ratio=1.5)


def test_the_distiller_trains_mgd_generators_and_adapters():
    torch.manual_seed(0)
    teacher, student = ToyNet(8), ToyNet(4)
    terms = [DistillTerm("mgd", student="body", teacher="body", adapter="conv1x1")]
    distiller = Distiller(teacher, student, terms, example_inputs=torch.rand(2, 3, 6, 6))
    generator = list(distiller.losses[0].generation.parameters())
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert generator and all(id(p) in trainable for p in generator)
    distiller(torch.rand(2, 3, 6, 6)).losses["total"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator)


# --- registry, shapes, gradient checks -----------------------------------------------------


def test_the_new_losses_are_registered_and_modules_agree_with_functions():
    s, t = tensor((2, 4, 3, 5), 20), tensor((2, 4, 3, 5), 21)
    assert L.build_loss("fitnet")(s, t).item() == L.fitnet_loss(s, t).item()
    assert L.build_loss("cwd", temperature=2.0)(s, t).item() == L.cwd_loss(s, t, 2.0).item()
    assert (L.build_loss("dist", temperature=2.0, beta=2.0, gamma=3.0)(s, t).item()
            == L.dist_loss(s, t, 2.0, 2.0, 3.0).item())
    assert {"fitnet": L.FitNetLoss, "cwd": L.CWDLoss, "dist": L.DISTLoss,
            "mgd": L.MGDLoss}.items() <= L.LOSSES.items()


@pytest.mark.parametrize(
    "loss, s_shape, t_shape, expected",
    [
        (L.fitnet_loss, (2, 4, 3, 3), (2, 8, 3, 3), "adapter"),
        (L.cwd_loss, (2, 4, 3, 3), (2, 4, 6, 6), "adapter"),
        (L.cwd_loss, (2, 4), (2, 4), "B×C×H×W"),
        (L.dist_loss, (2, 5), (2, 6), "logit shape"),
    ],
)
def test_shape_mismatch_says_what_and_how(loss, s_shape, t_shape, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        loss(torch.zeros(s_shape), torch.zeros(t_shape))
    assert "×".join(map(str, s_shape)) in str(info.value)


def test_teacher_side_gets_no_gradient():
    s = tensor((2, 3, 4, 4), 22, requires_grad=True)
    t = tensor((2, 3, 4, 4), 23, requires_grad=True)
    for loss in (L.fitnet_loss, L.cwd_loss, L.dist_loss):
        loss(s, t).backward()
    generator = L.mgd_generator(3).double()
    L.mgd_loss(s, t, generator, torch.ones(2, 1, 4, 4, dtype=torch.float64)).backward()
    assert s.grad is not None and t.grad is None


@pytest.mark.parametrize("loss", [L.fitnet_loss, L.cwd_loss, L.dist_loss])
def test_gradcheck(loss):
    s = tensor((2, 3, 3, 5), 24, requires_grad=True)
    t = tensor((2, 3, 3, 5), 25)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))


# --- a resumed MGD run is the uninterrupted one ----------------------------------------------


def _mgd_run(out, teacher, steps=6) -> dict:
    return {"task": "toy_task:ToyTask", "model": {"width": 4}, "out_dir": str(out),
            "data": {"length": 16},
            "train": {"steps": steps, "batch_size": 4, "log_every": 1, "lr": 0.01,
                      "schedule": "constant", "eval_every": 3},
            "teacher": {"model": {"width": 8}, "checkpoint": str(teacher)},
            "distillation": [{"loss": "mgd", "student": "body", "teacher": "body",
                              "adapter": "conv1x1", "args": {"alpha": 1.0, "ratio": 0.5}}]}


def test_a_resumed_mgd_run_draws_the_same_masks(tmp_path):
    """Stopped after 3 steps and resumed to 6 = 6 steps at once: student, adapter and
    generator weights equal bit for bit (the masks come from the run's stream)."""
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    save_atomic({"model": ToyNet(8).state_dict()}, teacher)
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(run_config_from_mapping(_mgd_run(whole, teacher)), ToyTask(), progress=False)
    for steps in (3, 6):
        train(run_config_from_mapping(_mgd_run(halves, teacher, steps)), ToyTask(),
              progress=False)

    def trained(run_dir):
        checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
        return {**checkpoint["model"], **checkpoint["distiller"]["losses"],
                **{f"adapter.{k}": v for k, v in checkpoint["distiller"]["adapters"].items()}}

    expected, got = trained(whole), trained(halves)
    assert any("generation" in name for name in expected)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name
    assert math.isfinite(float(next(iter(expected.values())).sum()))
