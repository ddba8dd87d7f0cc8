"""``kdkit export``: ONNX graphs that match PyTorch at sizes other than the traced one, and
the CPU latency measurement used by the comparison report."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import yaml

from kdkit import export as export_module
from kdkit.checkpoint import save_atomic
from kdkit.cli import main
from kdkit.export import cpu_latency_ms, export_onnx
from tasks.matting.models import DIM, DIMSpec
from tasks.segmentation.models import SegmentationFPN

onnxruntime = pytest.importorskip("onnxruntime", reason="install kdkit[export] to test ONNX")


def _onnx_output(path, *inputs):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {f"input{i}": x.numpy() for i, x in enumerate(inputs)})[0]


@pytest.mark.parametrize("model, channels", [
    (SegmentationFPN("resnet18", 4, 8, {"channels": [8, 8, 16, 16]}), 3),
    (DIM(DIMSpec(((4,), (8,), (8,), (8,), (8,)), (8, 8, 8, 4, 1))), 4),
])
def test_export_has_dynamic_sizes_and_matches_pytorch(tmp_path, model, channels):
    torch.manual_seed(0)
    path = export_onnx(model, (torch.rand(1, channels, 64, 64),), tmp_path / "m.onnx")
    other = torch.rand(2, channels, 40, 72)  # another batch and size than the traced one
    with torch.no_grad():
        expected = model.eval()(other).numpy()
    np.testing.assert_allclose(_onnx_output(path, other), expected, atol=1e-4)


def test_kdkit_export_writes_a_trained_model(tmp_path, capsys):
    model_spec = {"encoder": "resnet18", "encoder_args": {"channels": [8, 8, 16, 16]},
                  "decoder_channels": 8, "classes": 6}
    weights = tmp_path / "model.pt"
    torch.manual_seed(1)
    trained = SegmentationFPN("resnet18", 6, 8, {"channels": [8, 8, 16, 16]})
    save_atomic({"model": trained.state_dict()}, weights)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"task": "segmentation", "model": model_spec,
                                      "out_dir": str(tmp_path)}))
    out = tmp_path / "student.onnx"
    assert main(["export", str(config), "--checkpoint", str(weights), "--output", str(out),
                 "--size", "64", "64"]) == 0
    assert "checked against PyTorch with onnxruntime" in capsys.readouterr().out
    image = torch.rand(1, 3, 48, 48)
    with torch.no_grad():
        expected = trained.eval()(image).numpy()
    np.testing.assert_allclose(_onnx_output(out, image), expected, atol=1e-4)


def test_export_without_onnx_says_what_to_install(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(export_module.importlib.util, "find_spec",
                        lambda name: None if name == "onnx" else real(name))
    with pytest.raises(RuntimeError, match=r"pip install 'kdkit\[export\]'"):
        export_onnx(torch.nn.Conv2d(3, 1, 1), (torch.rand(1, 3, 8, 8),), tmp_path / "m.onnx")
    ms, runtime = cpu_latency_ms(torch.nn.Conv2d(3, 1, 1), (torch.rand(1, 3, 8, 8),), 2)
    assert runtime == "torch" and ms > 0


def test_latency_uses_onnxruntime_when_installed():
    ms, runtime = cpu_latency_ms(torch.nn.Conv2d(3, 4, 3), (torch.rand(1, 3, 32, 32),), 3)
    assert runtime == "onnxruntime" and 0 < ms < 1000
