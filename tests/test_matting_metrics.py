"""Matting metrics against hand-computed values and independent plain-Python references of the
official Composition-1k MATLAB code (loop correlation for Grad, BFS labelling for Conn)."""

import math
from collections import deque

import numpy as np
import pytest
import torch

from tasks.matting.metrics import (
    MSE,
    SAD,
    ConnectivityError,
    GradientError,
    _gaussian_gradient_kernels,
    connectivity_error,
    gradient_error,
    matting_metrics,
    mse,
    sad,
)

FUNCTIONS = {"SAD": sad, "MSE": mse, "Grad": gradient_error, "Conn": connectivity_error}
CLASSES = {"SAD": SAD, "MSE": MSE, "Grad": GradientError, "Conn": ConnectivityError}

# --- independent references -------------------------------------------------------------------


def ref_gaussgradient_kernel(sigma=1.4):
    """MATLAB gaussgradient's hx, element by element."""
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 0.01)))

    def gauss(x):
        return math.exp(-(x**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))

    def dgauss(x):
        return -x * gauss(x) / sigma**2

    offsets = range(-half, half + 1)
    hx = np.array([[gauss(i) * dgauss(j) for j in offsets] for i in offsets])
    return hx / math.sqrt(sum(v * v for v in hx.ravel()))


def ref_correlate_replicate(image, kernel):
    half = kernel.shape[0] // 2
    padded = np.pad(image, half, mode="edge")
    out = np.zeros_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            total = 0.0
            for a in range(kernel.shape[0]):
                for b in range(kernel.shape[1]):
                    total += kernel[a, b] * padded[y + a, x + b]
            out[y, x] = total
    return out


def ref_mat2gray(x):
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi == lo else (x - lo) / (hi - lo)


def ref_gradient_magnitude(image):
    hx = ref_gaussgradient_kernel()
    gx = ref_correlate_replicate(image, hx)
    gy = ref_correlate_replicate(image, hx.T)
    return np.sqrt(gx**2 + gy**2)


def ref_gradient_error(p, g, trimap, unknown=128):
    diff = ref_gradient_magnitude(ref_mat2gray(p)) - ref_gradient_magnitude(ref_mat2gray(g))
    return (
        sum(
            diff[y, x] ** 2
            for y in range(p.shape[0])
            for x in range(p.shape[1])
            if trimap[y, x] == unknown
        )
        / 1000
    )


def as_unit_float(alpha):
    return alpha / 255.0 if alpha.dtype == np.uint8 else alpha


def ref_components(mask):
    """4-connected components by BFS, numbered in MATLAB's column-major scan order."""
    height, width = mask.shape
    seen = np.zeros(mask.shape, dtype=bool)
    components = []
    for x in range(width):
        for y in range(height):
            if not mask[y, x] or seen[y, x]:
                continue
            seen[y, x] = True
            queue, pixels = deque([(y, x)]), []
            while queue:
                cy, cx = queue.popleft()
                pixels.append((cy, cx))
                for ny, nx in ((cy - 1, cx), (cy + 1, cx), (cy, cx - 1), (cy, cx + 1)):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            components.append(pixels)
    return components


def ref_connectivity_error(p, g, trimap, unknown=128):
    """compute_connectivity_error.m, line by line (MATLAB's max keeps the first maximum)."""
    thresholds = [k / 10 for k in range(11)]
    level = np.full(p.shape, -1.0)
    for i in range(1, len(thresholds)):
        t = thresholds[i]
        components = ref_components((p >= t) & (g >= t))
        omega = np.zeros(p.shape, dtype=bool)
        if components:
            best = components[0]
            for component in components[1:]:
                if len(component) > len(best):
                    best = component
            for y, x in best:
                omega[y, x] = True
        level[(level == -1) & ~omega] = thresholds[i - 1]
    level[level == -1] = 1
    total = 0.0
    for y in range(p.shape[0]):
        for x in range(p.shape[1]):
            if trimap[y, x] != unknown:
                continue
            d_p, d_g = p[y, x] - level[y, x], g[y, x] - level[y, x]
            phi_p = 1 - d_p if d_p >= 0.15 else 1.0
            phi_g = 1 - d_g if d_g >= 0.15 else 1.0
            total += abs(phi_p - phi_g)
    return total / 1000


# --- SAD and MSE by hand ----------------------------------------------------------------------

# U = (0,1), (1,0), (1,1), (2,1), (2,2): 5 pixels. The four corners outside U differ by 255.
TRIMAP = np.array([[0, 128, 255], [128, 128, 0], [255, 128, 128]], dtype=np.uint8)
GT = np.array([[0, 51, 255], [102, 255, 0], [255, 0, 204]], dtype=np.uint8)
PRED = np.array([[255, 0, 0], [153, 255, 255], [0, 51, 255]], dtype=np.uint8)
# In U: |0-51| = 51, |153-102| = 51, |255-255| = 0, |51-0| = 51, |255-204| = 51 (uint8 levels)
# -> four errors of 51/255 = 0.2 and one of 0.
HAND_SAD = (4 * 0.2) / 1000  # 0.0008
HAND_MSE = (4 * 0.2**2) / 5  # 0.16 / 5 = 0.032


def test_sad_mse_by_hand_uint8():
    assert sad(PRED, GT, TRIMAP) == pytest.approx(HAND_SAD, rel=1e-12)
    assert mse(PRED, GT, TRIMAP) == pytest.approx(HAND_MSE, rel=1e-12)


def test_sad_mse_by_hand_float_and_mixed():
    pred, gt = PRED / 255.0, (GT / 255.0).astype(np.float32)
    assert sad(pred, gt, TRIMAP) == pytest.approx(HAND_SAD, rel=1e-6)
    assert mse(pred, gt, TRIMAP) == pytest.approx(HAND_MSE, rel=1e-6)
    assert sad(PRED, GT / 255.0, TRIMAP) == pytest.approx(HAND_SAD, rel=1e-12)


@pytest.mark.parametrize("unknown", [102, 127])
def test_sad_mse_other_unknown_values(unknown):
    trimap = np.where(TRIMAP == 128, unknown, TRIMAP).astype(np.uint8)
    assert sad(PRED, GT, trimap, unknown_value=unknown) == pytest.approx(HAND_SAD, rel=1e-12)
    assert mse(PRED, GT, trimap, unknown_value=unknown) == pytest.approx(HAND_MSE, rel=1e-12)
    # With the default 128 this trimap has no unknown pixel: SAD sums nothing, MSE is 0.0.
    assert sad(PRED, GT, trimap) == 0.0
    assert mse(PRED, GT, trimap) == 0.0


def test_trimap_with_channels_uses_first_channel():
    rgb = np.stack([TRIMAP, np.full_like(TRIMAP, 128), np.zeros_like(TRIMAP)], axis=-1)
    assert sad(PRED, GT, rgb) == pytest.approx(HAND_SAD, rel=1e-12)
    assert mse(PRED, GT, rgb) == pytest.approx(HAND_MSE, rel=1e-12)


# --- Grad ------------------------------------------------------------------------------------


def test_gradient_kernel_shape_norm_and_symmetry():
    hx, hy = _gaussian_gradient_kernels()
    # h = ceil(1.4·sqrt(-2·ln(sqrt(2π)·1.4·0.01))) = ceil(1.4·sqrt(-2·ln 0.035094))
    #   = ceil(1.4·sqrt(6.6995)) = ceil(1.4·2.5883) = ceil(3.624) = 4  ->  9×9
    assert hx.shape == hy.shape == (9, 9)
    assert np.sqrt((hx**2).sum()) == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(hx[:, ::-1], -hx, atol=1e-15)  # odd in the column offset j
    np.testing.assert_allclose(hx[::-1, :], hx, atol=1e-15)  # even in the row offset i
    np.testing.assert_array_equal(hy, hx.T)
    # Column j = +1 (index 5) over j = +2 (index 6), same row: G'(1)/G'(2) = ½·exp(3/(2σ²)),
    # and G'(1) < 0: the kernel is negative to the right of the centre.
    assert hx[4, 5] / hx[4, 6] == pytest.approx(0.5 * math.exp(3 / (2 * 1.4**2)), rel=1e-12)
    assert hx[4, 5] < 0
    np.testing.assert_allclose(hx, ref_gaussgradient_kernel(), rtol=1e-12, atol=1e-15)


def test_gradient_error_matches_loop_reference():
    rng = np.random.default_rng(3)
    gt = np.clip(rng.random((12, 12)) * 1.4 - 0.2, 0, 1)
    pred = np.clip(gt + rng.normal(0, 0.2, (12, 12)), 0, 1)
    trimap = rng.choice(np.array([0, 128, 255]), size=(12, 12), p=[0.2, 0.6, 0.2])
    expected = ref_gradient_error(pred, gt, trimap)
    assert expected > 1e-3  # a real, non-trivial comparison
    assert gradient_error(pred, gt, trimap) == pytest.approx(expected, rel=1e-10)


def test_gradient_error_is_affine_invariant_through_mat2gray():
    rng = np.random.default_rng(4)
    gt, pred = rng.random((12, 12)), rng.random((12, 12))
    trimap = np.full((12, 12), 128)
    base = gradient_error(pred, gt, trimap)
    assert gradient_error(0.3 * pred + 0.5, gt, trimap) == pytest.approx(base, rel=1e-10)
    assert gradient_error(pred, 2.0 * gt - 0.25, trimap) == pytest.approx(base, rel=1e-10)
    # An affine copy of the ground truth scores 0, although its raw gradients are 0.3× smaller
    # (unnormalised error: Σ (0.3·|∇g| − |∇g|)² / 1000 = 0.49·Σ |∇g|² / 1000 > 0).
    assert gradient_error(0.3 * gt + 0.5, gt, trimap) == pytest.approx(0.0, abs=1e-20)
    assert 0.49 * (ref_gradient_magnitude(gt) ** 2).sum() / 1000 > 1e-3


def test_gradient_error_constant_prediction():
    rng = np.random.default_rng(5)
    gt = rng.random((12, 12))
    trimap = np.full((12, 12), 128)
    constant = np.full((12, 12), 0.7)
    # mat2gray maps a constant image to zeros: no gradient, so the error is Σ_U |∇g|² / 1000.
    expected = (ref_gradient_magnitude(ref_mat2gray(gt)) ** 2).sum() / 1000
    assert gradient_error(constant, gt, trimap) == pytest.approx(expected, rel=1e-10)
    assert gradient_error(constant, constant, trimap) == 0.0
    assert gradient_error(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), trimap[:4, :4]) == 0.0


# --- Conn ------------------------------------------------------------------------------------

ALL_UNKNOWN_3X3 = np.full((3, 3), 128)


def test_conn_ignores_the_background_component():
    # g = 1 at the centre only; p = 1 at the centre and 0.2 at the top-left corner.
    gt = np.zeros((3, 3))
    gt[1, 1] = 1.0
    pred = gt.copy()
    pred[0, 0] = 0.2
    # Foreground rule: at every t, (p >= t) & (g >= t) = {centre}, so Ω = {centre}. The other 8
    # pixels leave at t = 0.1 -> l = 0; the centre never leaves -> l = 1.
    #   corner: d_p = 0.2 >= 0.15 -> φ_p = 0.8; d_g = 0 -> φ_g = 1; |0.8 - 1| = 0.2
    #   centre: d = 0 for both -> 0;  other pixels: p = g = 0 -> 0.
    assert connectivity_error(pred, gt, ALL_UNKNOWN_3X3) == pytest.approx(0.2 / 1000, rel=1e-12)
    # (The background-wins bug picks the 8 zero pixels as Ω: the centre gets l = 0, φ = 0 for
    # both; the rest keep l = 1, φ = 1 for both; total 0.)
    assert ref_connectivity_error(pred, gt, ALL_UNKNOWN_3X3) == pytest.approx(0.2 / 1000)


def test_conn_ties_go_to_the_first_component_in_column_major_order():
    # Two single-pixel components A = (0, 2) and B = (2, 0): B comes first column by column,
    # A first row by row. p(A) = 1, g(A) = 0.95, p(B) = g(B) = 1, zeros elsewhere.
    pred, gt = np.zeros((3, 3)), np.zeros((3, 3))
    pred[0, 2], gt[0, 2] = 1.0, 0.95
    pred[2, 0], gt[2, 0] = 1.0, 1.0
    # MATLAB: t = 0.1..0.9 tie -> Ω = B, so A gets l = 0; t = 1: Ω = B. B keeps l = 1 (φ = 1).
    #   A: d_p = 1 -> φ_p = 0; d_g = 0.95 -> φ_g = 0.05; error 0.05.
    # (Row-major tie-breaking: Ω = A up to 0.9, A gets l = 0.9 at t = 1 -> φ = 1 both; B gets
    # l = 0 -> φ = 0 both; error 0.)
    assert connectivity_error(pred, gt, ALL_UNKNOWN_3X3) == pytest.approx(0.05 / 1000, rel=1e-9)
    assert connectivity_error(pred.T, gt.T, ALL_UNKNOWN_3X3) == 0.0  # A now first by column


def test_conn_thresholds_are_exact_tenths():
    # 1×3: X = (0, 0) with p = 153/255 = 0.6, g = 1. X is in Ω for t = 0.1..0.6 (0.6 >= 0.6, as
    # MATLAB's single(153)/255 >= 0.6); at t = 0.7 Ω is empty, so l(X) = 0.6.
    #   d_p = 0 -> φ_p = 1; d_g = 0.4 -> φ_g = 0.6; error 0.4. The zeros: l = 0, error 0.
    # (With thresholds 6·0.1 = 0.6000000000000001, X would leave at 0.6: l = 0.5, φ_p = 1,
    # φ_g = 0.5, error 0.5.)
    pred = np.array([[153, 0, 0]], dtype=np.uint8)
    gt = np.array([[255, 0, 0]], dtype=np.uint8)
    trimap = np.full((1, 3), 128)
    assert connectivity_error(pred, gt, trimap) == pytest.approx(0.4 / 1000, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conn_matches_bfs_reference(seed):
    rng = np.random.default_rng(seed)
    # Levels on the uint8 tenths (51 = 0.2, 102 = 0.4, ...) hit threshold ties and many equally
    # large components; smooth-ish float data gives larger, irregular components.
    levels = np.array([0, 51, 102, 153, 204, 255], dtype=np.uint8)
    cases = [
        (rng.choice(levels, (10, 10)), rng.choice(levels, (10, 10))),
        tuple(rng.integers(0, 256, (2, 10, 10), dtype=np.uint8)),
    ]
    base = np.clip(np.add.outer(np.linspace(-0.5, 1.5, 10), rng.normal(0, 0.3, 10)), 0, 1)
    cases.append((np.clip(base + rng.normal(0, 0.15, base.shape), 0, 1), base))
    trimap = rng.choice(np.array([0, 128, 255]), size=(10, 10), p=[0.1, 0.8, 0.1])
    for pred, gt in cases:
        expected = ref_connectivity_error(as_unit_float(pred), as_unit_float(gt), trimap)
        assert expected > 0
        assert connectivity_error(pred, gt, trimap) == pytest.approx(expected, rel=1e-10)


# --- torchmetrics classes --------------------------------------------------------------------


def _batch(seed, batch=2, size=10):
    rng = np.random.default_rng(seed)
    gt = rng.random((batch, 1, size, size))
    pred = np.clip(gt + rng.normal(0, 0.2, gt.shape), 0, 1)
    trimap = rng.choice(np.array([0, 128, 255], dtype=np.uint8), size=gt.shape, p=[0.2, 0.6, 0.2])
    return torch.tensor(pred), torch.tensor(gt), torch.tensor(trimap)


@pytest.mark.parametrize("key", list(CLASSES))
def test_metric_class_averages_over_images(key):
    pred, gt, trimap = _batch(7)
    metric = CLASSES[key]()
    metric.update(pred, gt, trimap)
    values = [
        FUNCTIONS[key](pred[i, 0].numpy(), gt[i, 0].numpy(), trimap[i, 0].numpy()) for i in range(2)
    ]
    assert values[0] != pytest.approx(values[1])
    assert int(metric.count) == 2
    assert metric.total.dtype == torch.float64
    assert float(metric.compute()) == pytest.approx((values[0] + values[1]) / 2, rel=1e-12)
    # B×H×W and H×W inputs describe the same images.
    other = CLASSES[key]()
    other.update(pred[:, 0], gt[:, 0], trimap[:, 0])
    other.update(pred[0, 0], gt[0, 0], trimap[0, 0])
    assert int(other.count) == 3
    assert float(other.compute()) == pytest.approx((2 * values[0] + values[1]) / 3, rel=1e-12)


def test_metric_class_uint8_and_unknown_value():
    pred = torch.tensor(PRED).reshape(1, 1, 3, 3)
    gt = torch.tensor(GT).reshape(1, 1, 3, 3)
    trimap = torch.tensor(np.where(TRIMAP == 128, 102, TRIMAP)).reshape(1, 1, 3, 3)
    metric = SAD(unknown_value=102)
    metric.update(pred, gt, trimap)
    assert float(metric.compute()) == pytest.approx(HAND_SAD, rel=1e-12)
    metric = MSE(unknown_value=102)
    metric.update(pred.float() / 255, gt.float() / 255, trimap.float())
    assert float(metric.compute()) == pytest.approx(HAND_MSE, rel=1e-6)


def test_matting_metrics_collection():
    collection = matting_metrics()
    assert set(collection.keys()) == {"SAD", "MSE", "Grad", "Conn"}
    # A perfect first batch makes all four states equal (0); torchmetrics' compute groups would
    # then merge the metrics and update only one of them from the second batch on.
    pred, gt, trimap = _batch(8, batch=1)
    collection.update(gt, gt, trimap)
    collection.update(pred, gt, trimap)
    result = collection.compute()
    for key, fn in FUNCTIONS.items():
        expected = fn(pred[0, 0].numpy(), gt[0, 0].numpy(), trimap[0, 0].numpy()) / 2
        assert float(result[key]) == pytest.approx(expected, rel=1e-12), key
    assert len({float(v) for v in result.values()}) == 4


def test_matting_metrics_collection_unknown_value():
    trimap = torch.tensor(np.where(TRIMAP == 128, 127, TRIMAP))
    collection = matting_metrics(unknown_value=127)
    collection.update(torch.tensor(PRED), torch.tensor(GT), trimap)
    result = collection.compute()
    assert float(result["SAD"]) == pytest.approx(HAND_SAD, rel=1e-12)
    assert float(result["MSE"]) == pytest.approx(HAND_MSE, rel=1e-12)


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", list(FUNCTIONS.values()))
def test_mismatched_shapes_raise(fn):
    with pytest.raises(ValueError, match=r"found pred \(4, 4\), gt \(4, 5\), trimap \(4, 4\)"):
        fn(np.zeros((4, 4)), np.zeros((4, 5)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"trimap \(5, 4\)"):
        fn(np.zeros((4, 4)), np.zeros((4, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="H×W"):
        fn(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), np.zeros((4, 4)))


def test_bad_dtype_and_metric_shapes_raise():
    with pytest.raises(TypeError, match="uint8"):
        sad(np.zeros((4, 4), np.int64), np.zeros((4, 4)), np.zeros((4, 4)))
    metric = SAD()
    with pytest.raises(ValueError, match="same number of images"):
        metric.update(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="B×1×H×W"):
        metric.update(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4))
