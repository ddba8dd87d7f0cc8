"""Every loss against an independent float64 NumPy implementation written from the formula
in docs/methods.md, on random inputs with zero-norm positions, channels and samples."""

import math

import numpy as np
import pytest
import torch
from helpers import array, tensor
from torch import nn

from kdkit import losses as L
from kdkit.errors import ConfigError

# --- independent references (NumPy, float64, straight from the definitions) -----------------


def ref_batch(s, t):
    def gram(f):
        q = f.reshape(f.shape[0], -1)
        g = q @ q.T
        return g / np.maximum(np.sqrt((g**2).sum(1, keepdims=True)), 1e-12)

    return ((gram(s) - gram(t)) ** 2).mean()


def ref_spatial(s, t):
    def sim(f):
        b, c = f.shape[:2]
        f = f.reshape(b, c, -1)
        f = f / (np.sqrt((f**2).sum(1, keepdims=True)) + 1e-7)
        return np.einsum("bci,bcj->bij", f, f)

    return ((sim(s) - sim(t)) ** 2).mean()


def ref_channel(s, t):
    def sim(f):
        b, c = f.shape[:2]
        f = f.reshape(b, c, -1)
        f = f / (np.sqrt((f**2).sum(2, keepdims=True)) + 1e-7)
        return np.einsum("bai,bci->bac", f, f)

    return ((sim(s) - sim(t)) ** 2).mean()


def ref_attention(s, t, p=2):
    def att(f):
        a = (np.abs(f) ** p).sum(1).reshape(f.shape[0], -1)
        return a / (np.sqrt((a**2).sum(1, keepdims=True)) + 1e-6)

    return ((att(s) - att(t)) ** 2).mean()


def ref_pool(f, h, w):
    b, c, hh, ww = f.shape
    return f.reshape(b, c, h, hh // h, w, ww // w).mean(axis=(3, 5))


def ref_fsp_matrix(f1, f2):
    if f1.shape[2] > f2.shape[2]:
        f1 = ref_pool(f1, *f2.shape[2:])
    elif f2.shape[2] > f1.shape[2]:
        f2 = ref_pool(f2, *f1.shape[2:])
    b, c1 = f1.shape[:2]
    a, c = f1.reshape(b, c1, -1), f2.reshape(b, f2.shape[1], -1)
    return np.einsum("bin,bjn->bij", a, c) / a.shape[2]


def ref_fsp(ss, ts):
    return sum(
        ((ref_fsp_matrix(ss[i], ss[i + 1]) - ref_fsp_matrix(ts[i], ts[i + 1])) ** 2).mean()
        for i in range(len(ss) - 1)
    )


def ref_margin(gamma, beta):
    """Heo et al.'s get_margin_from_BN, one channel at a time with math.erfc."""
    out = []
    for g, m in zip(gamma, beta):
        s = abs(g)
        cdf = 0.5 * math.erfc((m / s) / math.sqrt(2))  # Φ(−m/s)
        if cdf > 1e-3:
            out.append(-s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m)
        else:
            out.append(-3 * s)
    return np.array(out)


def ref_ofd(s, t, margin):
    target = np.maximum(t, margin.reshape(1, -1, 1, 1))
    mask = (s > target) | (target > 0)
    return ((s - target) ** 2 * mask).sum() / s.shape[0]


def ref_hinton(zs, zt, temperature):
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    ls, lt = log_softmax(zs), log_softmax(zt)
    kl = (np.exp(lt) * (lt - ls)).sum(1)
    return kl.mean() * temperature**2


# --- inputs with degenerate entries -----------------------------------------------------------


def with_zeros(f):
    """Zero one position (all channels), one channel (all positions) and, if the batch allows,
    one whole sample."""
    f = f.copy()
    f[0, :, 0, 0] = 0
    f[0, 1, :, :] = 0
    if f.shape[0] > 2:
        f[2] = 0
    return f


def as_torch(*arrays):
    return [torch.tensor(a) for a in arrays]


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize(
    "loss, reference, s_shape, t_shape",
    [
        (L.batch_similarity_loss, ref_batch, (4, 3, 5, 6), (4, 7, 2, 3)),
        (L.spatial_similarity_loss, ref_spatial, (3, 4, 5, 6), (3, 9, 5, 6)),
        (L.channel_similarity_loss, ref_channel, (3, 6, 5, 4), (3, 6, 3, 7)),
        (L.attention_transfer_loss, ref_attention, (3, 4, 5, 6), (3, 8, 5, 6)),
    ],
)
def test_feature_losses_match_reference(loss, reference, s_shape, t_shape, zeros):
    s, t = array(s_shape, 1), array(t_shape, 2)
    if zeros:
        s, t = with_zeros(s), with_zeros(t)
    got = loss(*as_torch(s, t))
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.item(), reference(s, t), rtol=1e-12, atol=1e-15)


def test_attention_transfer_with_other_p():
    s, t = array((2, 3, 4, 4), 3), array((2, 5, 4, 4), 4)
    got = L.attention_transfer_loss(*as_torch(s, t), p=3)
    np.testing.assert_allclose(got.item(), ref_attention(s, t, p=3), rtol=1e-12)


def test_spatial_similarity_of_identical_features_is_zero_and_scale_invariant():
    f = tensor((2, 5, 4, 4), 5)
    assert L.spatial_similarity_loss(f, f).item() == 0.0
    assert L.spatial_similarity_loss(3.0 * f, f).item() < 1e-12  # up to the 1e-7 in the norm


def test_fsp_matches_reference_with_pooling():
    shapes = [(2, 3, 8, 8), (2, 4, 4, 4), (2, 5, 4, 4)]
    ss = [array(sh, 10 + i) for i, sh in enumerate(shapes)]
    ts = [array(sh, 20 + i) for i, sh in enumerate(shapes)]
    got = L.fsp_loss(as_torch(*ss), as_torch(*ts))
    np.testing.assert_allclose(got.item(), ref_fsp(ss, ts), rtol=1e-12)


def test_fsp_matrix_shape_and_value():
    f1, f2 = array((2, 3, 4, 4), 1), array((2, 5, 2, 2), 2)
    got = L.fsp_matrix(*as_torch(f1, f2))
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(got.numpy(), ref_fsp_matrix(f1, f2), rtol=1e-12)


def make_bn(channels, seed):
    bn = nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(array(channels, seed)))
        bn.bias.copy_(torch.tensor(array(channels, seed + 1, scale=2.0)))
    return bn


def test_ofd_margin_matches_reference_per_channel():
    bn = make_bn(64, 7)
    gamma, beta = bn.weight.detach().numpy(), bn.bias.detach().numpy()
    expected = ref_margin(gamma, beta)
    assert (beta / np.abs(gamma) > 3.1).any(), "the −3s branch must be exercised"
    np.testing.assert_allclose(L.ofd_margin(bn).numpy(), expected, rtol=1e-10)
    assert (L.ofd_margin(bn).numpy() <= 0).all()


def test_ofd_margin_of_a_constant_channel():
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.copy_(torch.tensor([-0.5, 0.0, 2.0]))
    assert L.ofd_margin(bn).tolist() == [-0.5, 0.0, 0.0]


def test_ofd_loss_matches_reference():
    bn = make_bn(4, 9)
    margin = L.ofd_margin(bn)
    s, t = array((3, 4, 5, 5), 11), array((3, 4, 5, 5), 12)
    got = L.ofd_loss(*as_torch(s, t), margin)
    np.testing.assert_allclose(got.item(), ref_ofd(s, t, margin.numpy()), rtol=1e-12)


def test_ofd_layer_weights():
    assert L.ofd_layer_weights(4) == [0.125, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("shape", [(5, 7), (2, 6, 3, 4)])
def test_hinton_matches_reference(shape):
    zs, zt = array(shape, 13, scale=3.0), array(shape, 14, scale=3.0)
    got = L.hinton_kd_loss(*as_torch(zs, zt), temperature=2.5)
    np.testing.assert_allclose(got.item(), ref_hinton(zs, zt, 2.5), rtol=1e-12)


def test_teacher_side_gets_no_gradient():
    s = tensor((2, 3, 4, 4), 1, requires_grad=True)
    t = tensor((2, 3, 4, 4), 2, requires_grad=True)
    for loss in (L.spatial_similarity_loss, L.channel_similarity_loss, L.batch_similarity_loss,
                 L.attention_transfer_loss, L.hinton_kd_loss):
        loss(s, t).backward()
    assert s.grad is not None and t.grad is None


# --- gradients -----------------------------------------------------------------------------


GRADCHECK_CASES = {
    "batch": (L.batch_similarity_loss, (3, 2, 3, 3), (3, 4, 2, 2)),
    "spatial": (L.spatial_similarity_loss, (2, 3, 3, 3), (2, 5, 3, 3)),
    "channel": (L.channel_similarity_loss, (2, 3, 3, 4), (2, 3, 2, 2)),
    "attention": (L.attention_transfer_loss, (2, 3, 3, 3), (2, 4, 3, 3)),
    "hinton": (L.hinton_kd_loss, (2, 4, 2, 2), (2, 4, 2, 2)),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck(case):
    loss, s_shape, t_shape = GRADCHECK_CASES[case]
    s = tensor(s_shape, 30, requires_grad=True)
    t = tensor(t_shape, 31)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))


def test_gradcheck_fsp_and_ofd():
    s1 = tensor((2, 3, 4, 4), 40, requires_grad=True)
    s2 = tensor((2, 2, 2, 2), 41, requires_grad=True)
    t1, t2 = tensor((2, 3, 4, 4), 42), tensor((2, 2, 2, 2), 43)
    assert torch.autograd.gradcheck(lambda a, b: L.fsp_loss([a, b], [t1, t2]), (s1, s2))
    margin = L.ofd_margin(make_bn(3, 44))
    s = tensor((2, 3, 3, 3), 45, requires_grad=True)
    t = tensor((2, 3, 3, 3), 46)
    assert torch.autograd.gradcheck(lambda x: L.ofd_loss(x, t, margin), (s,))


# --- shape errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss, s_shape, t_shape, expected",
    [
        (L.channel_similarity_loss, (2, 4, 3, 3), (2, 8, 3, 3), "adapter"),
        (L.spatial_similarity_loss, (2, 4, 3, 3), (2, 4, 6, 6), "spatial size"),
        (L.spatial_similarity_loss, (2, 4, 3, 3), (3, 4, 3, 3), "batch size"),
        (L.attention_transfer_loss, (2, 4, 3, 3), (2, 4, 6, 6), "spatial size"),
        (L.batch_similarity_loss, (1, 4, 3, 3), (1, 4, 3, 3), "at least 2 samples"),
        (L.hinton_kd_loss, (2, 5), (2, 6), "logit shape"),
        (L.spatial_similarity_loss, (2, 4), (2, 4), "B×C×H×W"),
    ],
)
def test_shape_mismatch_says_what_and_how(loss, s_shape, t_shape, expected):
    with pytest.raises(ValueError, match=expected) as info:
        loss(torch.zeros(s_shape), torch.zeros(t_shape))
    message = str(info.value)
    assert "×".join(map(str, s_shape)) in message or expected == "at least 2 samples"


def test_fsp_channel_mismatch_names_adapter():
    s = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 2, 2)]
    t = [torch.zeros(2, 6, 4, 4), torch.zeros(2, 6, 2, 2)]
    with pytest.raises(ValueError, match="adapter"):
        L.fsp_loss(s, t)
    with pytest.raises(ValueError, match="at least 2"):
        L.fsp_loss(s[:1], t[:1])


# --- registry and modules -------------------------------------------------------------------


def test_registry_builds_every_loss_and_modules_agree_with_functions():
    s, t = tensor((2, 4, 3, 3), 50), tensor((2, 4, 3, 3), 51)
    pairs = {
        "batch_similarity": L.batch_similarity_loss,
        "spatial_similarity": L.spatial_similarity_loss,
        "channel_similarity": L.channel_similarity_loss,
        "attention_transfer": L.attention_transfer_loss,
        "hinton": L.hinton_kd_loss,
    }
    for name, function in pairs.items():
        assert L.build_loss(name)(s, t).item() == function(s, t).item()
    assert L.build_loss("hinton", temperature=2.0)(s, t).item() == L.hinton_kd_loss(s, t, 2.0)
    assert set(L.LOSSES) >= set(pairs) | {"fsp", "ofd"}


def test_unknown_loss_name_suggests_and_is_a_one_line_config_error():
    with pytest.raises(L.UnknownLossError, match="Did you mean 'spatial_similarity'") as info:
        L.build_loss("spatial_similarty")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("unknown loss 'spatial_similarty'")  # no KeyError quotes


def test_a_bad_keyword_names_the_accepted_ones_and_keeps_its_cause():
    with pytest.raises(ConfigError, match="bad arguments for loss 'hinton'.*takes: temperature"
                       ) as info:
        L.build_loss("hinton", temp=3)
    assert isinstance(info.value.__cause__, TypeError)


class _BrokenInside(L.DistillationLoss):
    def __init__(self, size: int = 2):
        super().__init__()
        self.table = torch.zeros(size) + None  # a TypeError in the constructor's own body


def test_a_type_error_inside_a_constructor_passes_through_with_its_traceback(monkeypatch):
    monkeypatch.setitem(L.LOSSES, "broken", _BrokenInside)
    with pytest.raises(TypeError, match="unsupported operand") as info:
        L.build_loss("broken", size=3)
    assert not isinstance(info.value, ConfigError)
    assert info.traceback[-1].name == "__init__"  # raised where it happened, not re-raised


def test_register_loss_adds_a_user_loss_that_build_loss_finds(monkeypatch):
    monkeypatch.setattr(L.registry, "LOSSES", dict(L.LOSSES))

    @L.register_loss("mean_gap")
    class MeanGap(L.DistillationLoss):
        def __init__(self, scale: float = 1.0):
            super().__init__()
            self.scale = scale

        def forward(self, student, teacher):
            return self.scale * (student.mean() - teacher.mean()).abs()

    loss = L.build_loss("mean_gap", scale=2.0)
    assert isinstance(loss, MeanGap)
    assert loss(torch.ones(2, 2), torch.zeros(2, 2)).item() == 2.0
    assert L.register_loss("mean_gap")(MeanGap) is MeanGap  # the same class again: a no-op


def test_a_taken_loss_name_is_refused(monkeypatch):
    monkeypatch.setattr(L.registry, "LOSSES", dict(L.LOSSES))
    with pytest.raises(ValueError, match="'hinton' is already registered.*HintonKDLoss"):

        @L.register_loss("hinton")
        class Other(L.DistillationLoss):
            pass


def test_every_built_in_loss_is_registered_by_its_decorator():
    built_in = {
        "hinton": L.HintonKDLoss, "attention_transfer": L.AttentionTransferLoss,
        "fsp": L.FSPLoss, "ofd": L.OFDLoss, "batch_similarity": L.BatchSimilarityLoss,
        "spatial_similarity": L.SpatialSimilarityLoss,
        "channel_similarity": L.ChannelSimilarityLoss,
        "spatial_channel_similarity": L.SpatialChannelSimilarityLoss,
    }
    assert {name: L.LOSSES[name] for name in built_in} == built_in
    assert all(issubclass(cls, L.DistillationLoss) for cls in L.LOSSES.values())


def test_the_distiller_contract_defaults_and_plain_modules():
    assert not L.takes_lists(L.HintonKDLoss()) and L.takes_lists(L.FSPLoss())
    assert not L.takes_lists(nn.MSELoss())
    L.bind_teacher(nn.MSELoss(), [nn.BatchNorm2d(2)])  # a plain module: nothing to bind
    L.bind_teacher(L.HintonKDLoss(), [nn.Linear(2, 2)])  # the default reads nothing
    ofd = L.OFDLoss()
    bn = nn.BatchNorm2d(3)
    L.bind_teacher(ofd, [bn])
    torch.testing.assert_close(ofd.margin, L.ofd_margin(bn))
    with pytest.raises(NotImplementedError, match="forward"):
        L.DistillationLoss()(torch.zeros(1), torch.zeros(1))


def test_ofd_module_without_margin_says_how():
    with pytest.raises(RuntimeError, match="ofd_margin"):
        L.OFDLoss()(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
