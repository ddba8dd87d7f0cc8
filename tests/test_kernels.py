"""Every similarity backend against the float64 materialised definition.

Triton runs on the GPU when there is one, else in the Triton interpreter on the CPU (small
shapes: the interpreter costs milliseconds per program). Tolerances are scaled to the size
of the terms the Gram identity cancels (‖Ktt‖² + ‖Kss‖², per map entry), not to the loss."""

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kdkit import kernels
from kdkit.errors import ConfigError
from kdkit.kernels import backends, common, factored, reference
from kdkit.losses import (
    channel_similarity_loss,
    spatial_channel_similarity_loss,
    spatial_similarity_loss,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["reference", "factored"] + (["triton"] if kernels.triton_available() else [])
needs_triton = pytest.mark.skipif(not kernels.triton_available(), reason="triton not installed")

# relative-to-cancelled-terms tolerance for each (input dtype, accumulate)
TOLERANCE = {
    ("float64", "fp64"): 1e-12, ("float64", "fp32"): 1e-5,
    ("float32", "fp64"): 1e-12, ("float32", "fp32"): 1e-5,
    ("bfloat16", "fp64"): 1e-12, ("bfloat16", "fp32"): 1e-5,
    ("float16", "fp64"): 1e-12, ("float16", "fp32"): 1e-5,
}


def cancelled_scale(student, teacher):
    """(‖F̂tF̂tᵀ‖² + ‖F̂sF̂sᵀ‖²) / (B·N²) in float64: the size of the terms the spatial
    identity subtracts, expressed per map entry like the loss."""
    fs = reference.normalize_positions(student.double())
    ft = reference.normalize_positions(teacher.double())
    n = fs.shape[2]
    terms = (ft @ ft.mT).square().sum() + (fs @ fs.mT).square().sum()
    return (terms / (fs.shape[0] * n * n)).item()


def cancelled_grad_scale(student):
    """‖∂(‖F̂sF̂sᵀ‖² / (B·N²))/∂s‖ in float64: the size of the gradient terms that cancel."""
    s = student.detach().double().requires_grad_()
    fs = reference.normalize_positions(s)
    n = fs.shape[2]
    (grad,) = torch.autograd.grad((fs @ fs.mT).square().sum() / (fs.shape[0] * n * n), s)
    return grad.norm().item()


def float64_loss_and_grad(function, student, teacher):
    s = student.detach().double().requires_grad_()
    loss = function(s, teacher.detach().double(), backend="reference")
    (grad,) = torch.autograd.grad(loss, s)
    return loss.item(), grad


def loss_and_grad(function, student, teacher, backend, accumulate):
    s = student.detach().clone().requires_grad_()
    loss = function(s, teacher, backend=backend, accumulate=accumulate)
    (grad,) = torch.autograd.grad(loss, s)
    return loss, grad


def features(shape, dtype=torch.float32, zeros=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=g, dtype=torch.float64)
    if zeros:
        f[0, :, 0] = 0  # an all-zero position
        f[-1, 0, :] = 0  # an all-zero channel
    return f.to(DEVICE, dtype)


SHAPES = [  # (B, Cs, Ct, H, W): N off the block size, C = 1, C over one tile
    (2, 5, 7, 6, 7),
    (1, 1, 1, 9, 9),
    (3, 1, 4, 1, 1),  # factored takes the maps here (N < C) ...
    (2, 70, 33, 5, 13),  # ... and here
    (1, 40, 24, 10, 10),  # Grams over several tiles
    (2, 12, 12, 8, 8),  # equal channels: factored's "auto" takes the differences form
]


def test_factored_takes_the_cheaper_route():
    assert factored.gram_is_cheaper(6400, 64, 128)  # the papers' conv2
    assert not factored.gram_is_cheaper(100, 512, 512)  # conv5: 10×10 positions
    assert not factored.gram_is_cheaper(1, 1, 4)


# the precision a form computes in → loss tolerance (relative to the cancelled terms, and
# to the loss) and gradient tolerance (relative to its norm); "maps": float32 maps built
# directly; "differences": float32 Grams of F̂t ± F̂s (factored, equal widths)
LOSS_TOL = {"maps": (1e-6, 1e-7), "fp32": (1e-5, 1e-7), "fp64": (1e-12, 1e-7),
            "differences": (1e-12, 1e-6)}
GRAD_RTOL = {"maps": 1e-3, "fp32": 1e-3, "fp64": 1e-6, "differences": 1e-5}


def form_precision(backend, accumulate, cancels, equal_widths):
    """What a backend computes a form in: ``cancels`` when it is a Gram identity,
    ``equal_widths`` when student and teacher have as many rows (channels for spatial)."""
    if backend == "reference" or (accumulate == "auto" and not cancels):
        return "maps"
    if accumulate != "auto":
        return accumulate
    return "differences" if backend == "factored" and equal_widths else "fp64"


def assert_matches_float64(function, s, t, backend, accumulate, cancels, scaled=lambda f: f):
    """``function`` on float32 ``s``, ``t`` against the float64 materialised definition,
    within the tolerance of the precision the form computes in; ``scaled`` maps the
    features to those whose spatial identity the form is (the transpose for channels)."""
    expected, expected_grad = float64_loss_and_grad(function, s, t)
    loss, grad = loss_and_grad(function, s, t, backend, accumulate)
    assert loss.dtype == torch.float32 and torch.isfinite(grad).all()
    precision = form_precision(backend, accumulate, cancels,
                               scaled(s).shape[1] == scaled(t).shape[1])
    tol, rel = LOSS_TOL[precision]
    assert abs(loss.item() - expected) <= (tol * cancelled_scale(scaled(s), scaled(t))
                                           + rel * expected)
    # float32 maps (reference) and float32 Grams carry ~1e-7 relative rounding per entry,
    # which the gradient's own cancellation amplifies; float64 Grams do not
    grad_error = (grad.double() - expected_grad).norm()
    assert grad_error <= (10 * tol * cancelled_grad_scale(scaled(s))
                          + GRAD_RTOL[precision] * expected_grad.norm())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accumulate", ["auto", "fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("zeros", [False, True])
def test_spatial_matches_float64_reference(backend, accumulate, shape, zeros):
    b, cs, ct, h, w = shape
    s = features((b, cs, h * w), zeros=zeros, seed=1).view(b, cs, h, w)
    t = features((b, ct, h * w), zeros=zeros, seed=2).view(b, ct, h, w)
    cancels = factored.gram_is_cheaper(h * w, cs, ct)
    assert_matches_float64(spatial_similarity_loss, s, t, backend, accumulate, cancels)


CHANNEL_SHAPES = [  # (B, C, Ns, Nt): positions ≥ channels (C×C maps) and below (N×N Grams)
    (2, 5, 42, 30),
    (1, 1, 9, 4),
    (1, 40, 9, 16),  # N×N Grams, batch 1
    (3, 33, 4, 6),  # N×N Grams, batch 3
    (2, 40, 9, 9),  # N×N Grams, equal positions: factored's "auto" takes the differences
    (2, 24, 20, 20),  # C×C maps at N ≈ C
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("accumulate", ["auto", "fp32", "fp64"])
@pytest.mark.parametrize("shape", CHANNEL_SHAPES)
@pytest.mark.parametrize("zeros", [False, True])
def test_channel_matches_float64_reference(backend, accumulate, shape, zeros):
    """The channel loss is the spatial loss of the transposed features: the ``C×C`` maps
    while ``N`` is above about ``C``, the identity over the ``N×N`` Grams below."""
    b, c, ns, nt = shape
    s = features((b, c, ns), zeros=zeros, seed=3)
    t = features((b, c, nt), zeros=zeros, seed=4)
    cancels = factored.gram_is_cheaper(c, ns, nt)
    assert_matches_float64(channel_similarity_loss, s, t, backend, accumulate, cancels,
                           scaled=factored.channels_as_positions)


def test_the_channel_shapes_take_both_forms():
    forms = {factored.gram_is_cheaper(c, ns, nt) for _, c, ns, nt in CHANNEL_SHAPES}
    assert forms == {True, False}


class _MatmulDtypes(TorchDispatchMode):
    """The dtypes of the matrix products that ops compute."""

    def __init__(self):
        super().__init__()
        self.dtypes = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in ("mm", "matmul", "baddbmm")):
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("function, student, teacher, dtype", [
    # C×C Grams: with equal channels the differences form (float32), else float64
    (spatial_similarity_loss, (2, 16, 400), (2, 16, 400), torch.float32),
    (spatial_similarity_loss, (2, 16, 400), (2, 24, 400), torch.float64),
    (spatial_similarity_loss, (2, 40, 9), (2, 40, 9), torch.float32),  # N×N maps
    (channel_similarity_loss, (2, 16, 400), (2, 16, 400), torch.float32),  # C×C maps
    # N×N Grams: with equal positions the differences form (float32), else float64
    (channel_similarity_loss, (2, 40, 9), (2, 40, 9), torch.float32),
    (channel_similarity_loss, (2, 40, 9), (2, 40, 16), torch.float64),
])
def test_auto_multiplies_in_float64_only_where_the_identity_cancels(function, student,
                                                                     teacher, dtype):
    s = features(student, seed=5).requires_grad_()
    t = features(teacher, seed=6)
    with _MatmulDtypes() as products:
        function(s, t, backend="factored").backward()
    assert products.dtypes == {dtype}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zeros", [False, True])
def test_channel_and_batch_match_float64_reference(backend, zeros):
    s = features((3, 6, 40), zeros=zeros, seed=3).view(3, 6, 5, 8)
    t = features((3, 6, 12), zeros=zeros, seed=4).view(3, 6, 3, 4)
    for function in (channel_similarity_loss, kernels_batch_loss):
        expected, expected_grad = float64_loss_and_grad(function, s, t)
        loss, grad = loss_and_grad(function, s, t, backend, "fp64")
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


def kernels_batch_loss(student, teacher, backend="auto", accumulate="fp64"):
    from kdkit.losses import batch_similarity_loss

    return batch_similarity_loss(student, teacher, backend, accumulate)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_spatial_channel_equals_the_sum(backend):
    s = features((2, 9, 30), zeros=True, seed=5).view(2, 9, 5, 6)
    t = features((2, 9, 30), seed=6).view(2, 9, 5, 6)

    def both(a, b, backend="reference", accumulate="fp64"):
        return spatial_similarity_loss(a, b, backend) + channel_similarity_loss(a, b, backend)

    expected, expected_grad = float64_loss_and_grad(both, s, t)
    loss, grad = loss_and_grad(spatial_channel_similarity_loss, s, t, backend, "fp64")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("noise", [1e-2, 1e-3])
@pytest.mark.parametrize("c, n", [(32, 300), (128, 64)])  # N above C, and a deep layer's below
def test_default_precision_holds_near_convergence(backend, noise, c, n):
    """Student = teacher + noise: the identities cancel terms ~10⁶ times the loss, yet the
    default accumulation keeps loss and gradient within 1e-3 of the float64 reference, for
    every term and for both forms of each."""
    t = features((2, c, n), seed=7)
    s = (t.double() + noise * features((2, c, n), torch.float64, seed=8)).float()
    for function in (spatial_similarity_loss, channel_similarity_loss,
                     spatial_channel_similarity_loss):
        expected, expected_grad = float64_loss_and_grad(function, s, t)
        s_ = s.detach().clone().requires_grad_()
        loss = function(s_, t, backend=backend)  # default accumulate
        (grad,) = torch.autograd.grad(loss, s_)
        assert abs(loss.item() - expected) <= 1e-3 * expected
        assert (grad.double() - expected_grad).norm() <= 1e-3 * expected_grad.norm()


@needs_triton
@pytest.mark.parametrize("c, n, by_kernels", [
    (16, 400, {"spatial", "channel", "spatial+channel"}),
    (40, 9, set()),  # spatial by N×N maps, channel by N×N Grams: both in factored
    (24, 30, {"channel", "spatial+channel"}),  # spatial by maps, channel by the raw Gram kernel
])
def test_triton_leaves_the_n_by_n_forms_to_factored(monkeypatch, c, n, by_kernels):
    """The kernels compute C×C Grams; a layer where an N×N form is the cheaper one (N below
    about C) is computed by factored, with the same value."""
    from kdkit.kernels import triton_similarity

    launched, stacked_gram = [], triton_similarity.stacked_gram
    monkeypatch.setattr(triton_similarity, "stacked_gram",
                        lambda *a, **k: launched.append(1) or stacked_gram(*a, **k))
    s, t = features((2, c, n), seed=21), features((2, c, n), seed=22)
    for name, function in (("spatial", spatial_similarity_loss),
                           ("channel", channel_similarity_loss),
                           ("spatial+channel", spatial_channel_similarity_loss)):
        launched.clear()
        loss = function(s, t, backend="triton")
        assert bool(launched) == (name in by_kernels)
        expected = function(s, t, backend="factored").item()
        assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("function, c, n, dim", [
    (spatial_similarity_loss, 32, 300, 1),  # Cs = 2·Ct: the C×C Grams in float64
    (channel_similarity_loss, 256, 32, 2),  # Ns = 2·Nt: the N×N Grams in float64
])
def test_default_precision_holds_near_convergence_at_different_widths(backend, function, c,
                                                                      n, dim):
    """A student that repeats the teacher's channels (positions) has the same spatial
    (channel) maps, so it can be near-converged at another width: the default still holds
    loss and gradient within 1e-3 of the float64 reference there."""
    t = features((2, c, n), seed=23)
    doubled = torch.cat([t.double(), t.double()], dim=dim)
    s = (doubled + 1e-3 * features(doubled.shape, torch.float64, seed=24)).float()
    expected, expected_grad = float64_loss_and_grad(function, s, t)
    loss, grad = loss_and_grad(function, s, t, backend, "auto")
    assert abs(loss.item() - expected) <= 1e-3 * expected
    assert (grad.double() - expected_grad).norm() <= 1e-3 * expected_grad.norm()


def test_fp32_accumulation_loses_accuracy_near_convergence():
    """Why fp64 is the default: documents the failure it avoids (kernels.md)."""
    t = features((2, 32, 400), seed=9)
    s = (t.double() + 1e-3 * features((2, 32, 400), torch.float64, seed=10)).float()
    expected, _ = float64_loss_and_grad(spatial_similarity_loss, s, t)
    fp32 = factored.spatial_similarity(s, t, "fp32").item()
    assert abs(fp32 - expected) > 1e-3 * expected


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("accumulate", ["fp32", "fp64"])
def test_triton_input_dtypes(dtype, accumulate):
    s = features((2, 6, 50), dtype, seed=11).view(2, 6, 5, 10)
    t = features((2, 6, 50), dtype, seed=12).view(2, 6, 5, 10)
    expected, expected_grad = float64_loss_and_grad(spatial_channel_similarity_loss, s, t)
    loss, grad = loss_and_grad(spatial_channel_similarity_loss, s, t, "triton", accumulate)
    assert grad.dtype == dtype
    name = str(dtype).removeprefix("torch.")
    tol = TOLERANCE[(name, accumulate)]
    assert abs(loss.item() - expected) <= tol * cancelled_scale(s, t) + 1e-6 * expected
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-6)


class _LargeAllocations(TorchDispatchMode):
    """Bytes of the floating-point tensors of at least ``threshold`` elements that ops
    create (views, in-place ops and the Triton interpreter's host copies excluded)."""

    def __init__(self, threshold):
        super().__init__()
        self.threshold, self.bytes = threshold, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if not any(part in name for part in ("set_", "copy_", "view", "detach", "alias")):
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(o, torch.Tensor) and o.is_floating_point()
                        and o.numel() >= self.threshold):
                    self.bytes += o.numel() * o.element_size()
        return out


@needs_triton
@pytest.mark.parametrize("loss_fn", [spatial_channel_similarity_loss, channel_similarity_loss])
def test_triton_backward_allocates_one_buffer_besides_the_gradient(loss_fn):
    # at 1024² crops a B×C×N float64 buffer is a GB: the backward may add one float32
    # buffer of the student's size to the gradient itself, no more
    s = features((2, 16, 1024), seed=19).view(2, 16, 32, 32).requires_grad_()
    t = features((2, 16, 1024), seed=20).view(2, 16, 32, 32)
    loss = loss_fn(s, t, backend="triton", accumulate="fp64")
    with _LargeAllocations(s.numel() // 2) as allocations:
        loss.backward()
    assert allocations.bytes <= 2 * s.numel() * 4


@needs_triton
def test_triton_before_3_9_takes_16_bit_maps_through_float32_for_fp64(monkeypatch):
    # Triton < 3.9 cannot compile a float64 dot of 16-bit loads: such maps are upcast first,
    # and the loss and the (bf16) gradient are as without the detour
    from kdkit.kernels import triton_similarity

    monkeypatch.setattr(triton_similarity, "NARROW_FP64_DOT_BROKEN", True)
    assert triton_similarity.launch_dtype(torch.bfloat16, torch.float64) == torch.float32
    assert triton_similarity.launch_dtype(torch.float16, torch.float64) == torch.float32
    assert triton_similarity.launch_dtype(torch.bfloat16, torch.float32) == torch.bfloat16
    assert triton_similarity.launch_dtype(torch.float32, torch.float64) == torch.float32
    s = features((2, 6, 50), torch.bfloat16, seed=21).view(2, 6, 5, 10)
    t = features((2, 6, 50), torch.bfloat16, seed=22).view(2, 6, 5, 10)
    expected, expected_grad = float64_loss_and_grad(spatial_channel_similarity_loss, s, t)
    loss, grad = loss_and_grad(spatial_channel_similarity_loss, s, t, "triton", "fp64")
    assert grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("splits", [2, 3, 7])
def test_triton_sums_partial_grams_over_slices_of_positions(monkeypatch, splits):
    # on a GPU the positions are cut into slices whose partial Grams are summed after;
    # off a GPU there is one slice, so the split path is forced here (N off the tiles)
    from kdkit.kernels import triton_similarity

    monkeypatch.setattr(triton_similarity, "_splits", lambda *args: splits)
    s = features((2, 5, 300), seed=23).view(2, 5, 15, 20)
    t = features((2, 40, 300), seed=24).view(2, 40, 15, 20)
    for function in (spatial_similarity_loss, channel_similarity_loss):
        teacher = t if function is spatial_similarity_loss else t[:, :5]
        expected, expected_grad = float64_loss_and_grad(function, s, teacher)
        loss, grad = loss_and_grad(function, s, teacher, "triton", "fp64")
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-9)


def test_splits_bound_programs_and_partial_memory():
    from kdkit.kernels import triton_similarity

    class FakeGpu:
        type = "cuda"

    props = type("Props", (), {"multi_processor_count": 132})()
    cuda = torch.cuda
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cuda, "get_device_properties", lambda device: props)
        splits = triton_similarity._splits
        # the batch Gram: 16 rows, one block pair, 819,200 positions: two waves of slices
        assert splits(1, 1, 16, 819_200, 32, torch.float64, FakeGpu()) == 264
        # many block pairs already fill the GPU: one slice
        assert splits(16, 8, 256, 6400, 16, torch.float64, FakeGpu()) == 1
        # few positions: slices of at least 8 tiles
        assert splits(1, 1, 16, 1024, 32, torch.float64, FakeGpu()) == 4
        # 2048 rows in few pairs (to isolate the bound): partials within PARTIAL_GRAM_BYTES
        assert splits(1, 2, 2048, 10**6, 32, torch.float64, FakeGpu()) == 2
    assert triton_similarity._splits(1, 1, 16, 819_200, 32, torch.float64,
                                     torch.device("cpu")) == 1


@needs_triton
@pytest.mark.parametrize("kernel", ["_gram", "_gram_grad"])
def test_a_failing_kernel_says_which_backend_to_use(monkeypatch, kernel):
    from kdkit.kernels import triton_similarity

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("PassManager::run failed\n<a page of MLIR>")
            return launch

    monkeypatch.setattr(triton_similarity, kernel, Broken())
    s = features((2, 4, 30), seed=25).requires_grad_()
    t = features((2, 4, 30), seed=26)
    with pytest.raises(triton_similarity.KernelFailure) as failure:
        spatial_similarity_loss(s, t, backend="triton").backward()
    message = str(failure.value)
    stage = "forward" if kernel == "_gram" else "backward"
    assert f"failed in the {stage} pass" in message
    assert "RuntimeError: PassManager::run failed)" in message
    assert "KDKIT_SIMILARITY_BACKEND=factored" in message and "MLIR" not in message


@needs_triton
def test_triton_takes_student_and_teacher_of_different_dtypes():
    # a bf16 student under autocast against a float32 teacher: promoted to float32, the
    # gradient comes back in the student's dtype
    s = features((2, 6, 50), torch.bfloat16, seed=17).view(2, 6, 5, 10)
    t = features((2, 40, 50), seed=18).view(2, 40, 5, 10)
    expected, expected_grad = float64_loss_and_grad(spatial_similarity_loss, s, t)
    loss, grad = loss_and_grad(spatial_similarity_loss, s, t, "triton", "fp64")
    assert grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # a float32 result
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-6)


@needs_triton
def test_triton_takes_channels_last_and_non_contiguous_inputs():
    s = features((2, 8, 36), seed=13).view(2, 8, 6, 6)
    t = features((2, 8, 36), seed=14).view(2, 8, 6, 6)
    expected, expected_grad = float64_loss_and_grad(spatial_channel_similarity_loss, s, t)
    variants = [
        (s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)),
        (s.transpose(2, 3).contiguous().transpose(2, 3), t[:, :, :, :]),
        (torch.stack([s, s], dim=2)[:, :, 0], torch.cat([t, t], dim=3)[..., :6]),
    ]
    for a, b in variants:
        loss, grad = loss_and_grad(spatial_channel_similarity_loss, a, b, "triton", "fp64")
        assert loss.item() == pytest.approx(expected, rel=1e-6)
        torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-9)


@needs_triton
@pytest.mark.skipif(DEVICE != "cuda", reason="N > 100k is minutes in the interpreter; GPU only")
def test_triton_large_n_on_gpu():
    s = features((1, 4, 131_072), seed=15)
    t = features((1, 4, 131_072), seed=16)
    expected = factored.spatial_similarity(s, t).item()
    assert kernels.spatial_similarity(s, t, "triton").item() == pytest.approx(expected, rel=1e-9)


def test_auto_backend_and_environment_override(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert kernels.resolve_backend("auto", cpu).name == "factored"
    monkeypatch.setenv(kernels.ENV_BACKEND, "reference")
    assert kernels.resolve_backend("auto", cpu).name == "reference"
    assert kernels.resolve_backend("factored", cpu).name == "factored"  # explicit wins
    monkeypatch.setenv(kernels.ENV_BACKEND, "fast")
    with pytest.raises(ValueError, match=f"'fast' \\(from {kernels.ENV_BACKEND}\\)"):
        kernels.resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="accumulate must be"):
        spatial_similarity_loss(torch.ones(2, 2, 2, 2), torch.ones(2, 2, 2, 2), "factored",
                                "fp16")


def test_triton_without_triton_installed_says_what_to_do(monkeypatch):
    monkeypatch.setattr(backends, "package_installed", lambda name: name != "triton")
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert not kernels.triton_available()
    assert kernels.resolve_backend("auto", torch.zeros(1)).name == "factored"
    assert kernels.resolve_backend("auto", torch.zeros(1, device="meta")).name == "factored"
    assert kernels.native_backends("cuda") == ["reference", "factored"]
    with pytest.raises(ValueError, match="needs the triton package.*backend='factored'"):
        kernels.resolve_backend("triton", torch.zeros(1))


@needs_triton
def test_triton_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the CPU refusal is only reachable without a GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        kernels.resolve_backend("triton", torch.zeros(1))
    assert os.environ["TRITON_INTERPRET"] == "0"


# --- the backend registry ----------------------------------------------------------------------


def test_the_registry_knows_where_each_backend_runs(monkeypatch):
    monkeypatch.setattr(backends, "package_installed", lambda name: True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert list(kernels.BACKENDS) == ["reference", "factored", "triton"]
    assert kernels.native_backends("cpu") == ["reference", "factored"]
    assert kernels.native_backends("cuda") == ["reference", "factored", "triton"]
    assert not kernels.BACKENDS["reference"].accumulates
    assert kernels.BACKENDS["triton"].refusal("cuda") is None
    assert "CUDA tensors (found cpu)" in kernels.BACKENDS["triton"].refusal("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.BACKENDS["triton"].refusal("cpu") is None  # on request, in the interpreter
    assert not kernels.BACKENDS["triton"].runs_on("cpu")  # but "auto" never picks it there


def test_auto_picks_the_highest_priority_backend_that_runs_natively(monkeypatch):
    monkeypatch.setattr(backends, "package_installed", lambda name: True)
    monkeypatch.delenv(kernels.ENV_BACKEND, raising=False)
    assert kernels.resolve_backend("auto", torch.zeros(1, device="meta")).name == "factored"

    class Cuda:  # a stand-in with a CUDA device type, no GPU needed
        device = torch.device("cuda")

    assert kernels.resolve_backend("auto", Cuda).name == "triton"


def sum_of_squares_module():
    """A backend module without a fused spatial+channel function."""
    import types

    def loss(student, teacher, accumulate):
        return (student - teacher).square().sum()

    return types.SimpleNamespace(batch_similarity=loss, spatial_similarity=loss,
                                 channel_similarity=loss)


@pytest.fixture
def registry():
    """The backend registry, restored after the test."""
    saved = dict(kernels.BACKENDS)
    yield kernels.BACKENDS
    kernels.BACKENDS.clear()
    kernels.BACKENDS.update(saved)


def test_a_registered_backend_is_dispatched_to_and_sums_the_fused_loss(monkeypatch, registry):
    toy = backends.register_backend(backends.Backend("toy", "toy_backend_module"))
    monkeypatch.setattr(backends.Backend, "load", lambda self: sum_of_squares_module())
    s, t = torch.ones(1, 1, 2), torch.zeros(1, 1, 2)
    assert spatial_similarity_loss(s, t, backend="toy").item() == 2.0
    assert spatial_channel_similarity_loss(s, t, backend="toy").item() == 4.0
    assert backends.register_backend(toy) is toy  # the same backend again: a no-op
    with pytest.raises(ValueError, match="'toy' is already registered"):
        backends.register_backend(backends.Backend("toy", "another_module"))
    with pytest.raises(ConfigError, match="unknown similarity backend 'toys'.*toy"):
        kernels.resolve_backend("toys", s)


def test_the_bench_command_line_reads_the_registry(registry):
    from kdkit.cli import build_parser

    backends.register_backend(backends.Backend("toy", "toy_module"))
    args = build_parser().parse_args(["bench", "kernels", "--backends", "toy", "factored"])
    assert args.backends == ["toy", "factored"]


# --- the helpers the backends share --------------------------------------------------------------


def test_precision_rules():
    assert kernels.DEFAULT_ACCUMULATE == "auto"
    for cancels in (True, False):
        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            assert common.accumulation_dtype("fp32", cancels, dtype) == torch.float32
            assert common.accumulation_dtype("fp64", cancels, dtype) == torch.float64
            auto = torch.float64 if cancels else common.result_dtype(dtype)
            assert common.accumulation_dtype("auto", cancels, dtype) == auto
    with pytest.raises(ConfigError, match="accumulate must be 'auto', 'fp32' or 'fp64', got "
                                          "'tf32'"):
        common.accumulation_dtype("tf32")
    results = {d: common.result_dtype(d) for d in
               (torch.float16, torch.bfloat16, torch.float32, torch.float64)}
    assert results == {torch.float16: torch.float32, torch.bfloat16: torch.float32,
                       torch.float32: torch.float32, torch.float64: torch.float64}
    for dtype, expected in ((torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)):
        assert common.at_least_float32(torch.zeros(1, dtype=dtype)).dtype == expected


def test_gram_identities_against_the_materialised_float64_maps():
    s, t = features((2, 5, 3, 4), torch.float64, zeros=True), features((2, 7, 3, 4), torch.float64,
                                                                      seed=1)
    fs, ft = reference.normalize_positions(s), reference.normalize_positions(t)
    spatial = common.spatial_loss_from_grams(ft @ ft.mT, fs @ fs.mT, ft @ fs.mT, 12)
    expected = (reference.spatial_similarity_map(s) - reference.spatial_similarity_map(t))
    assert spatial.item() == pytest.approx(expected.square().mean().item(), rel=1e-12)
    raw = s.flatten(2)
    torch.testing.assert_close(common.channel_map_from_gram(raw @ raw.mT),
                               reference.channel_similarity_map(s), rtol=1e-12, atol=1e-15)
    q = s.flatten(1)
    rows = q @ q.T
    by_hand = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(common.batch_map_from_gram(rows), by_hand, rtol=1e-14, atol=0)
