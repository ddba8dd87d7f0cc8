"""``kdkit export``: a trained model to ONNX, and CPU inference latency for the report.

The ONNX graph takes the task's model inputs (``Task.flops_inputs``) with dynamic batch,
height and width, exported with the TorchScript-based exporter (``dynamo=False``; it needs
the ``onnx`` package). With ``onnxruntime`` installed too (``pip install 'kdkit[export]'``)
the export is checked against PyTorch on the example input, and latency is measured with
it; otherwise latency is measured with PyTorch.
"""

from __future__ import annotations

import importlib.util
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kdkit.bench import median_ms

__all__ = ["cpu_latency_ms", "export_onnx", "has_onnxruntime"]

CPU = torch.device("cpu")


def has_onnxruntime() -> bool:
    """Whether ONNX export and onnxruntime are both installed (``kdkit[export]``)."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))


def export_onnx(model: nn.Module, inputs: tuple[torch.Tensor, ...], path: str | Path,
                opset: int = 17) -> Path:
    """Write ``model`` (evaluated on the CPU) to ``path`` with dynamic batch and spatial
    sizes; returns the path. With onnxruntime installed, the exported graph's output must
    match PyTorch's on ``inputs`` (max abs difference below 1e-4) or this raises."""
    if importlib.util.find_spec("onnx") is None:
        raise RuntimeError("ONNX export needs the onnx package: pip install 'kdkit[export]' "
                           "(onnx and onnxruntime)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    names = [f"input{i}" for i in range(len(inputs))]
    dynamic = {name: {0: "batch", 2: "height", 3: "width"} for name in names + ["output"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
        torch.onnx.export(model, inputs, str(path), input_names=names, output_names=["output"],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False)
    if has_onnxruntime():
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})[0]
        with torch.no_grad():
            expected = model(*inputs).numpy()
        error = float(np.abs(got - expected).max())
        if error > 1e-4:
            raise RuntimeError(f"the ONNX export of {type(model).__name__} differs from PyTorch "
                               f"by {error:.3g} on the example input; not trusting {path}")
    return path


def cpu_latency_ms(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                   repeats: int = 5) -> tuple[float, str]:
    """(median ms of one forward on the CPU after a warm-up, runtime used): onnxruntime
    when installed, else PyTorch in inference mode."""
    model = model.cpu().eval()
    if has_onnxruntime():
        import onnxruntime

        with tempfile.TemporaryDirectory() as folder:
            path = export_onnx(model, inputs, Path(folder) / "model.onnx")
            session = onnxruntime.InferenceSession(str(path),
                                                   providers=["CPUExecutionProvider"])
        feed = {f"input{i}": x.numpy() for i, x in enumerate(inputs)}
        return median_ms(lambda: session.run(None, feed), CPU, repeats), "onnxruntime"
    with torch.inference_mode():
        return median_ms(lambda: model(*inputs), CPU, repeats), "torch"
