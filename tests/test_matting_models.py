import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdkit.capture import FeatureRecorder
from kdkit.errors import ConfigError
from tasks.matting import models
from tasks.matting.losses import alpha_prediction_loss, composition_loss
from tasks.matting.models import (
    DIM,
    DIMSpec,
    TimmMatting,
    dim_student,
    dim_teacher,
    network_input,
    unpool2x,
    unpool2x_scatter,
)
from tasks.matting.task import MattingTask


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def teacher():
    return dim_teacher().eval()


@pytest.fixture(scope="module")
def student():
    return dim_student(adapters=True).eval()


def test_parameter_counts_match_the_papers(teacher, student):
    assert count(teacher) == 25_582_595
    assert count(dim_student()) == 4_877_283
    assert count(student) == 5_181_795


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (70, 20), (5, 9)])
def test_any_input_size_comes_back_at_that_size(student, size):
    x = torch.randn(2, 4, *size)
    with torch.no_grad():
        alpha = student(x)
    assert alpha.shape == (2, 1, *size)
    assert ((alpha > 0) & (alpha < 1)).all()


def test_distilled_layers_and_adapters_have_the_papers_shapes(teacher, student):
    x = torch.randn(1, 4, 64, 64)
    positions = [16, 8, 4, 2]  # 64 / 4, / 8, / 16, / 32
    for model, channels in ((teacher, [128, 256, 512, 512]), (student, [64, 128, 256, 256])):
        recorder = FeatureRecorder(model.distilled_layers()).initialize(model)
        with torch.no_grad(), recorder:
            model(x)
        shapes = [tuple(recorder[name].shape) for name in model.distilled_layers()]
        assert shapes == [(1, c, p, p) for c, p in zip(channels, positions)]
    recorder = FeatureRecorder(student.adapter_layers()).initialize(student)
    with torch.no_grad(), recorder:
        student(x)
    assert [recorder[n].shape[1] for n in student.adapter_layers()] == [128, 256, 512, 512]


def test_ofd_points_are_the_last_batchnorm_before_a_relu(teacher, student):
    modules = dict(teacher.named_modules())
    assert teacher.ofd_layers() == ["conv2.units.1.bn", "conv3.units.2.bn",
                                    "conv4.units.2.bn", "conv5.units.2.bn"]
    assert student.ofd_layers()[0] == "conv2.units.0.bn"
    for name in teacher.ofd_layers():
        assert isinstance(modules[name], nn.BatchNorm2d)
        relu = modules[name.rsplit(".", 1)[0] + ".relu"]
        assert isinstance(relu, nn.ReLU) and not relu.inplace


def test_decoder_unpools_with_the_encoder_indices():
    """A one-block DIM whose convs pass channel 0 through: after unpooling, the output is
    nonzero exactly at the maximum of each 2×2 window (fresh BNs in eval are identities)."""
    model = DIM(DIMSpec(encoder=((1,),), decoder=(1,))).eval()
    with torch.no_grad():
        for conv, centre in ((model.conv1.units[0].conv, 1), (model.deconv1.conv, 2)):
            conv.weight.zero_()
            conv.weight[0, 0, centre, centre] = 1.0
            conv.bias.zero_()
        x = torch.rand(1, 4, 32, 32) + 0.1
        y = torch.logit(model(x).double())
    windows = x[0, 0].unfold(0, 2, 2).unfold(1, 2, 2).reshape(16, 16, 4)
    maxima = torch.zeros(16, 16, 4, dtype=torch.bool).scatter_(2, windows.argmax(2, True), True)
    expected = maxima.view(16, 16, 2, 2).permute(0, 2, 1, 3).reshape(32, 32)
    assert torch.equal(y[0, 0].abs() > 1e-4, expected)


def test_max_unpool_and_the_export_scatter_agree_in_value_and_gradient():
    """Training unpools with F.max_unpool2d, export with the scatter: same outputs and
    gradients, with and without channels_last and for ties (equal values in a window)."""
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    x[0, 0, :2, :2] = 1.0  # a window of ties
    for memory_format in (torch.contiguous_format, torch.channels_last):
        pooled, indices = F.max_pool2d(x.to(memory_format=memory_format), 2,
                                       return_indices=True)
        weight = torch.randn(2, 3, 8, 12, dtype=torch.float64)
        results = []
        for unpool in (unpool2x, unpool2x_scatter):
            p = pooled.detach().clone().requires_grad_()
            out = unpool(p, indices)
            (grad,) = torch.autograd.grad((out * weight).sum(), p)
            results.append((out, grad))
        (fast, fast_grad), (scatter, scatter_grad) = results
        assert torch.equal(fast, scatter) and torch.equal(fast_grad, scatter_grad)


def test_unpooling_takes_the_scatter_only_while_tracing(monkeypatch):
    calls, scatter = [], models.unpool2x_scatter
    monkeypatch.setattr(models, "unpool2x_scatter",
                        lambda x, i: calls.append("scatter") or scatter(x, i))
    pooled, indices = F.max_pool2d(torch.randn(1, 2, 4, 4), 2, return_indices=True)
    models.unpool2x(pooled, indices)
    assert calls == []
    torch.jit.trace(models.unpool2x, (pooled, indices))  # traces, then checks the trace
    assert calls and set(calls) == {"scatter"}


SMALL = DIMSpec(((4,), (8,), (8,), (8,), (8,)), (8, 8, 8, 4, 1))


def test_refinement_starts_as_the_identity_and_then_learns():
    """A refined DIM with the coarse network's weights gives the coarse alpha at
    initialisation (zero last conv); one SGD step on the alpha loss moves the refinement's
    output conv, and the output then differs; its parameters are the hand count."""
    torch.manual_seed(0)
    coarse = DIM(SMALL).eval()
    refined = DIM(DIMSpec(SMALL.encoder, SMALL.decoder, refine=6)).eval()
    missing, unexpected = refined.load_state_dict(coarse.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("refine.") for key in missing)
    extra = sum(p.numel() for p in refined.refine.parameters())
    assert extra == (5 * 6 * 9 + 6) + 2 * (6 * 6 * 9 + 6) + 3 * 2 * 6 + (6 * 9 + 1)
    x = torch.randn(2, 4, 40, 24)
    torch.testing.assert_close(refined(x), coarse(x), rtol=0, atol=0)
    before = refined(x).detach()  # in eval mode throughout: no BN statistics move
    target = torch.rand(2, 1, 40, 24)
    loss = F.l1_loss(refined(x), target)
    loss.backward()
    assert refined.refine.out.weight.grad.abs().sum() > 0
    torch.optim.SGD(refined.refine.parameters(), lr=0.5).step()
    assert not torch.allclose(refined(x), before)
    with pytest.raises(ValueError, match="refine is a channel count"):
        DIMSpec(SMALL.encoder, SMALL.decoder, refine=-1)


def test_the_config_adds_the_refinement_stage():
    spec = {"name": "dim", "encoder_channels": [list(b) for b in SMALL.encoder],
            "decoder_channels_dim": list(SMALL.decoder)}
    assert MattingTask().build_model(spec).refine is None
    assert MattingTask().build_model({**spec, "refine_channels": 6}).refine.out.in_channels == 6
    with pytest.raises(ConfigError, match="refine_channels"):
        MattingTask().build_model({**spec, "refine_channels": -1})


def test_decoder_relu_is_dims_own_decoder():
    """``decoder_relu`` adds no parameter and puts a ReLU after every decoder stage but the
    last (whose output is the alpha's logit): with the same weights, the deepest stage's
    output is the plain model's, clipped at zero, and the alphas differ."""
    torch.manual_seed(0)
    plain = DIM(SMALL).eval()
    relu = DIM(DIMSpec(SMALL.encoder, SMALL.decoder, decoder_relu=True)).eval()
    relu.load_state_dict(plain.state_dict())  # strict: the same parameters and buffers
    assert [relu.get_submodule(f"deconv{k}").relu is not None for k in (5, 4, 3, 2, 1)] == [
        True, True, True, True, False]
    outputs = {}
    for name, model in (("plain", plain), ("relu", relu)):
        model.deconv5.register_forward_hook(
            lambda module, args, out, name=name: outputs.__setitem__(name, out))
    x = torch.randn(2, 4, 64, 64)
    alpha_plain, alpha_relu = plain(x), relu(x)
    assert (outputs["plain"] < 0).any()
    torch.testing.assert_close(outputs["relu"], outputs["plain"].clamp(min=0))
    assert not torch.allclose(alpha_plain, alpha_relu)
    spec = {"name": "dim", "encoder_channels": [list(b) for b in SMALL.encoder],
            "decoder_channels_dim": list(SMALL.decoder), "decoder_relu": True}
    assert MattingTask().build_model(spec).deconv2.relu is not None


@pytest.mark.parametrize("encoder", ["resnet18", "mobilenetv2_100"])
def test_timm_encoder_model(encoder):
    model = TimmMatting(encoder).eval()
    x = torch.randn(1, 4, 45, 61)
    recorder = FeatureRecorder(model.feature_layers()).initialize(model)
    with torch.no_grad(), recorder:
        alpha = model(x)
    assert alpha.shape == (1, 1, 45, 61)
    widths = [recorder[name].shape[1] for name in model.feature_layers()]
    assert widths == model.encoder.feature_info.channels()


def test_network_input_normalises_rgb_and_scales_trimap():
    image = torch.full((1, 3, 2, 2), 0.485)
    trimap = torch.tensor([0.0, 128.0, 255.0, 0.0]).view(1, 1, 2, 2)
    x = network_input(image, trimap)
    assert x.shape == (1, 4, 2, 2)
    assert x[0, 0].abs().max() < 1e-6  # the red mean maps to 0
    torch.testing.assert_close(x[0, 3].flatten(), torch.tensor([0, 128 / 255, 1, 0]))


def test_alpha_prediction_loss_by_hand():
    pred = torch.tensor([0.2, 0.5, 0.9, 0.0]).view(1, 1, 2, 2)
    target = torch.tensor([0.0, 0.5, 0.6, 1.0]).view(1, 1, 2, 2)
    trimap = torch.tensor([128, 128, 128, 255]).view(1, 1, 2, 2)
    expected = (math.sqrt(0.2**2 + 1e-12) + 1e-6 + math.sqrt(0.3**2 + 1e-12)) / (3 + 1e-6)
    loss = alpha_prediction_loss(pred, target, trimap)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    trimap_102 = torch.where(trimap == 128, 102, trimap)
    assert alpha_prediction_loss(pred, target, trimap_102, unknown_value=102).item() == (
        pytest.approx(expected, rel=1e-6))
    assert alpha_prediction_loss(pred, target, trimap_102).item() == pytest.approx(0, abs=1e-9)


def test_composition_loss_is_zero_for_the_true_alpha():
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 1, 4, 4, generator=g)
    fg, bg = torch.rand(2, 3, 4, 4, generator=g), torch.rand(2, 3, 4, 4, generator=g)
    image = alpha * fg + (1 - alpha) * bg
    trimap = torch.full((2, 1, 4, 4), 128)
    assert composition_loss(alpha, image, fg, bg, trimap).item() == pytest.approx(1e-6, rel=1e-3)
    wrong = composition_loss(alpha * 0.5, image, fg, bg, trimap).item()
    expected = ((alpha * 0.5 * (fg - bg) - alpha * (fg - bg)).abs().mean()).item()
    assert wrong == pytest.approx(expected, rel=1e-3)


def test_loss_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="share batch and spatial size"):
        alpha_prediction_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5),
                              torch.zeros(1, 1, 4, 4))
