import pytest
import timm
import torch
from torch import nn

from kdkit.capture import FeatureRecorder, FeatureRef, UnknownModuleError, resolve_module
from kdkit.errors import ConfigError, FeatureError, KdkitError


@pytest.fixture(scope="module")
def resnet():
    return timm.create_model("resnet10t", num_classes=3, pretrained=False).eval()


class SharedTwice(nn.Module):
    """Applies one conv twice (shared weights) with a ReLU between."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(2, 2, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.shared(self.act(self.shared(x)))


def test_records_timm_layers_exactly(resnet):
    x = torch.randn(2, 3, 64, 64)
    recorder = FeatureRecorder(["layer4", "fc"], source="output").initialize(resnet)
    with torch.no_grad(), recorder:
        logits = resnet(x)
    with torch.no_grad():
        torch.testing.assert_close(recorder["layer4"], resnet.forward_features(x), rtol=0, atol=0)
    torch.testing.assert_close(recorder["fc"], logits, rtol=0, atol=0)
    assert recorder["layer4"].shape == (2, 512, 2, 2)


def test_records_inputs(resnet):
    x = torch.randn(2, 3, 32, 32)
    recorder = FeatureRecorder(["fc"], source="input").initialize(resnet)
    with torch.no_grad(), recorder:
        resnet(x)
    with torch.no_grad():
        pooled = resnet.forward_features(x).mean((2, 3))
    torch.testing.assert_close(recorder["fc"], pooled)


def test_module_called_twice_keeps_every_call():
    model = SharedTwice()
    x = torch.randn(1, 2, 5, 5)
    recorder = FeatureRecorder(["shared"]).initialize(model)
    with recorder:
        out = model(x)
    assert recorder.calls("shared") == 2
    first = model.shared(x)
    torch.testing.assert_close(recorder.get("shared", 0), first)
    torch.testing.assert_close(recorder["shared[1]"], out)
    torch.testing.assert_close(recorder["shared"], out)  # no index: the last call
    with pytest.raises(FeatureError, match="ran 2 time"):
        recorder.get("shared", 2)


def test_records_are_cleared_on_entry_and_hooks_removed_on_exit():
    model = SharedTwice()
    recorder = FeatureRecorder(["shared"]).initialize(model)
    for _ in range(3):
        with recorder:
            model(torch.randn(1, 2, 4, 4))
    assert recorder.calls("shared") == 2
    assert not model.shared._forward_hooks


def test_persistent_hooks_stay_but_record_only_while_entered():
    model = SharedTwice()
    recorder = FeatureRecorder(["shared"], persistent=True).initialize(model)
    with recorder:
        model(torch.randn(1, 2, 4, 4))
    hooks = dict(model.shared._forward_hooks)
    assert len(hooks) == 1
    model(torch.randn(1, 2, 4, 4))  # outside: not recorded
    assert recorder.calls("shared") == 2
    with recorder:
        model(torch.randn(1, 2, 4, 4))
    assert dict(model.shared._forward_hooks) == hooks  # the same hook, not a new one
    assert recorder.calls("shared") == 2
    recorder.remove()
    assert not model.shared._forward_hooks


def test_detach_for_the_teacher_side():
    model = SharedTwice()
    recorder = FeatureRecorder(["shared"], detach=True).initialize(model)
    with recorder:
        model(torch.randn(1, 2, 4, 4))
    assert not recorder["shared"].requires_grad
    kept = FeatureRecorder(["shared"]).initialize(model)
    with kept:
        model(torch.randn(1, 2, 4, 4))
    assert kept["shared"].requires_grad


def inplace_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True)).eval()


def test_output_overwritten_in_place_is_rejected():
    model = inplace_model()
    recorder = FeatureRecorder(["1"]).initialize(model)
    with torch.no_grad(), recorder:
        model(torch.randn(2, 3, 6, 6))
    with pytest.raises(FeatureError, match="clone=True"):
        recorder["1"]


def test_output_overwritten_in_place_is_safe_with_clone():
    model = inplace_model()
    x = torch.randn(2, 3, 6, 6)
    recorder = FeatureRecorder(["1"], clone=["1"]).initialize(model)
    with torch.no_grad(), recorder:
        model(x)
        expected = model[1](model[0](x))
    torch.testing.assert_close(recorder["1"], expected)
    assert (recorder["1"] < 0).any(), "the pre-ReLU values must survive"


def test_unknown_name_lists_closest_names(resnet):
    with pytest.raises(UnknownModuleError, match="closest valid names: layer2") as info:
        FeatureRecorder(["layr2"]).initialize(resnet)
    assert "ResNet" in str(info.value)
    # the command line prints a KdkitError's str() as its one line: no KeyError quotes
    assert isinstance(info.value, KdkitError) and isinstance(info.value, KeyError)
    assert str(info.value).startswith("model (ResNet) has no submodule named 'layr2'")
    with pytest.raises(RuntimeError, match="initialize"):
        with FeatureRecorder(["layer2"]):
            pass


def test_wrappers_are_unwrapped(resnet):
    x = torch.randn(1, 3, 32, 32)
    expected = FeatureRecorder(["layer3"]).initialize(resnet)
    with torch.no_grad(), expected:
        resnet(x)
    wrappers = [nn.DataParallel(resnet), torch.compile(resnet, backend="eager")]
    for wrapped in wrappers:
        for name in ("layer3", "module.layer3", "_orig_mod.layer3"):
            recorder = FeatureRecorder([name]).initialize(wrapped)
            with torch.no_grad(), recorder:
                wrapped(x)
            torch.testing.assert_close(recorder["layer3"], expected["layer3"])
    assert resolve_module(wrappers[1], "layer3") is resnet.layer3


def test_feature_ref_parsing():
    assert FeatureRef.parse("a.b") == FeatureRef("a.b", -1)
    assert FeatureRef.parse("blocks.0[1]") == FeatureRef("blocks.0", 1)
    assert FeatureRef.parse("x[-2]") == FeatureRef("x", -2)
    assert str(FeatureRef("x", 3)) == "x[3]"
    with pytest.raises(ConfigError, match="call index"):
        FeatureRef.parse("x[1")


def test_non_tensor_output_is_a_clear_error():
    lstm = nn.Sequential(nn.LSTM(3, 4))
    recorder = FeatureRecorder(["0"]).initialize(lstm)
    with pytest.raises(FeatureError, match="not a tensor"), recorder:
        lstm(torch.randn(2, 1, 3))


def test_a_module_that_did_not_run_is_a_feature_error_the_cli_prints_in_one_line():
    class SkipsOne(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.used(x)

    model = SkipsOne()
    recorder = FeatureRecorder(["unused"]).initialize(model)
    with recorder:
        model(torch.randn(1, 3, 4, 4))
        with pytest.raises(FeatureError, match="'unused' did not run") as info:
            recorder.get("unused")
    assert isinstance(info.value, KdkitError)  # kdkit's CLI prints it in one line
