"""Alpha-matting metrics as the official Composition-1k MATLAB evaluation code computes them.

Every metric is summed over the unknown region ``U = (trimap == unknown_value)`` of one image
(``unknown_value`` is 128 by default; some public trimaps use 127 or 102) and averaged over
images. Alphas ``p`` (prediction) and ``g`` (ground truth) are floats in [0, 1]; uint8 mattes
are divided by 255.

* **SAD** ``= Σ_U |p − g| / 1000``.
* **MSE** ``= Σ_U (p − g)² / |U|``: the raw mean, *not* scaled by 1000 (tables that report
  "MSE ×10⁻³" multiply it by 1000 themselves); 0.0 when ``U`` is empty.
* **Grad** ``= Σ_U (|∇p| − |∇g|)² / 1000``: ``p`` and ``g`` are first min–max normalised over
  the whole image (MATLAB ``mat2gray``), then filtered (replicate border) with the 9×9
  first-derivative-of-Gaussian kernels ``hx``, ``hy = hxᵀ`` of σ = 1.4 from ``gaussgradient``;
  ``|∇x| = sqrt(gx² + gy²)``.
* **Conn** ``= Σ_U |φ_p − φ_g| / 1000``: for thresholds ``t_i = i/10``, ``i = 1..10``, ``Ω_i``
  is the largest 4-connected foreground component of ``(p ≥ t_i) ∧ (g ≥ t_i)``; ``l`` is the
  ``t_{i−1}`` of the first ``i`` whose ``Ω_i`` leaves the pixel out (1 if none does);
  ``d = x − l`` and ``φ_x = 1 − d·[d ≥ 0.15]``.

Functional forms take one NumPy H×W image; the ``torchmetrics`` classes take batches of
tensors and average the functional values over images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from torchmetrics import Metric, MetricCollection

__all__ = [
    "sad",
    "mse",
    "gradient_error",
    "connectivity_error",
    "SAD",
    "MSE",
    "GradientError",
    "ConnectivityError",
    "matting_metrics",
]

_GRAD_SIGMA = 1.4
# Exactly the doubles nearest to 0.0, 0.1, ..., 1.0. np.arange(0, 1, 0.1) would give
# 0.6000000000000001, so an alpha of 153/255 (= 0.6) would fail ``p >= 0.6``, whereas MATLAB's
# single(153)/255 passes it.
_CONN_THRESHOLDS = np.arange(11) / 10
_CONN_MIN_DISTANCE = 0.15


# --- input handling ---------------------------------------------------------------------------


def _as_float_alpha(alpha: np.ndarray, name: str, role: str) -> np.ndarray:
    """Float64 copy of an alpha matte: uint8 is divided by 255, floats are taken as [0, 1]."""
    if alpha.dtype == np.uint8:
        return alpha.astype(np.float64) / 255.0
    if np.issubdtype(alpha.dtype, np.floating):
        return alpha.astype(np.float64)
    raise TypeError(
        f"{name}: {role} must be a float alpha in [0, 1] or uint8 in [0, 255], got dtype "
        f"{alpha.dtype}. Convert it first, e.g. alpha.astype(np.float32) / 65535 for uint16."
    )


def _unknown_mask(trimap: np.ndarray, unknown_value: float) -> np.ndarray:
    """Boolean H×W mask of the unknown region ``trimap == unknown_value``."""
    return trimap == unknown_value


def _prepare(
    name: str, pred: Any, gt: Any, trimap: Any, unknown_value: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate one image triple; return float64 ``p``, ``g`` and the boolean unknown mask."""
    pred, gt, trimap = np.asarray(pred), np.asarray(gt), np.asarray(trimap)
    found = f"found pred {pred.shape}, gt {gt.shape}, trimap {trimap.shape}"
    if trimap.ndim == 3:
        trimap = trimap[..., 0]
    if pred.ndim != 2 or pred.size == 0 or not pred.shape == gt.shape == trimap.shape:
        raise ValueError(
            f"{name}: expected pred and gt as non-empty H×W alphas and trimap as H×W (or H×W×C, "
            f"first channel used), all at the same resolution; {found}. Squeeze batch and "
            "channel dimensions and resize the prediction to the ground-truth size."
        )
    p = _as_float_alpha(pred, name, "pred")
    g = _as_float_alpha(gt, name, "gt")
    return p, g, _unknown_mask(trimap, unknown_value)


# --- functional metrics -----------------------------------------------------------------------


def sad(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray, unknown_value: float = 128) -> float:
    """Sum of absolute differences over the unknown region, divided by 1000.

    ``pred``, ``gt``: H×W alphas (float in [0, 1] or uint8); ``trimap``: H×W or H×W×C with
    values 0 / ``unknown_value`` / 255 (first channel used) → float.
    """
    p, g, unknown = _prepare("sad", pred, gt, trimap, unknown_value)
    return float(np.abs(p - g)[unknown].sum() / 1000)


def mse(pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray, unknown_value: float = 128) -> float:
    """Mean squared error over the unknown region: ``Σ_U (p − g)² / |U|``.

    The raw mean, not multiplied by 1000 (papers that print "MSE ×10⁻³" scale it themselves).
    Returns 0.0 when the trimap has no unknown pixel. Shapes as in :func:`sad` → float.
    """
    p, g, unknown = _prepare("mse", pred, gt, trimap, unknown_value)
    count = int(unknown.sum())
    if count == 0:
        return 0.0
    return float(((p - g) ** 2)[unknown].sum() / count)


def _mat2gray(x: np.ndarray) -> np.ndarray:
    """MATLAB ``mat2gray``: ``(x − min) / (max − min)`` over the image; all zeros if constant."""
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _gaussian_gradient_kernels(sigma: float = _GRAD_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """``(hx, hy)`` of the official ``gaussgradient``: ``(2h+1)×(2h+1)``, h = 4 for σ = 1.4.

    ``hx[i, j] = G(i)·G′(j)`` for row offset i and column offset j in [−h, h], scaled to unit
    Frobenius norm; ``hy = hxᵀ``.
    """
    half = math.ceil(sigma * math.sqrt(-2 * math.log(math.sqrt(2 * math.pi) * sigma * 0.01)))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    gauss = np.exp(-(offsets**2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    dgauss = -offsets * gauss / sigma**2
    hx = np.outer(gauss, dgauss)
    hx /= np.sqrt((hx**2).sum())
    return hx, hx.T.copy()


def _gradient_magnitude(x: np.ndarray, hx: np.ndarray, hy: np.ndarray) -> np.ndarray:
    # cv2.filter2D correlates, like MATLAB imfilter(..., 'replicate'). The official code passes
    # 'conv', which only flips the sign of gx and gy (hx is odd in j, even in i): same magnitude.
    gx = cv2.filter2D(x, cv2.CV_64F, hx, borderType=cv2.BORDER_REPLICATE)
    gy = cv2.filter2D(x, cv2.CV_64F, hy, borderType=cv2.BORDER_REPLICATE)
    return np.sqrt(gx**2 + gy**2)


def gradient_error(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray, unknown_value: float = 128
) -> float:
    """Gradient error ``Σ_U (|∇p| − |∇g|)² / 1000`` after min–max normalising ``p`` and ``g``.

    Gradients: σ = 1.4 derivative-of-Gaussian filters, replicate border. Because of the
    normalisation the value is invariant to ``p → a·p + b`` (a > 0). Shapes as in :func:`sad`
    → float.
    """
    p, g, unknown = _prepare("gradient_error", pred, gt, trimap, unknown_value)
    hx, hy = _gaussian_gradient_kernels()
    diff = _gradient_magnitude(_mat2gray(p), hx, hy) - _gradient_magnitude(_mat2gray(g), hx, hy)
    return float((diff**2)[unknown].sum() / 1000)


def _largest_foreground_component(mask: np.ndarray) -> np.ndarray:
    """Boolean H×W mask of the largest 4-connected component of ``mask`` (all False if none).

    Only foreground components compete (OpenCV's label 0, the background, is skipped). Among
    equally large components the winner is the one reached first in column-major order, as
    with MATLAB's ``max`` over ``bwconncomp`` components (numbered column by column).
    """
    count, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=4
    )
    if count == 1:
        return np.zeros(mask.shape, dtype=bool)
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = 1 + np.flatnonzero(areas == areas.max())
    column_major = labels.ravel(order="F")
    winner = column_major[np.argmax(np.isin(column_major, largest))]
    return labels == winner


def connectivity_error(
    pred: np.ndarray, gt: np.ndarray, trimap: np.ndarray, unknown_value: float = 128
) -> float:
    """Connectivity error ``Σ_U |φ_p − φ_g| / 1000`` with thresholds 0, 0.1, ..., 1.

    ``φ_x = 1 − d·[d ≥ 0.15]``, ``d = x − l``, where ``l`` is the threshold just below the first
    one at which the pixel drops out of the largest 4-connected foreground component of
    ``(p ≥ t) ∧ (g ≥ t)`` (1 if it never does). Shapes as in :func:`sad` → float.
    """
    p, g, unknown = _prepare("connectivity_error", pred, gt, trimap, unknown_value)
    level = np.ones_like(p)  # pixels that stay in every Ω keep l = 1
    unassigned = np.ones(p.shape, dtype=bool)
    for lower, threshold in zip(_CONN_THRESHOLDS[:-1], _CONN_THRESHOLDS[1:]):
        omega = _largest_foreground_component((p >= threshold) & (g >= threshold))
        level[unassigned & ~omega] = lower
        unassigned &= omega
    d_p, d_g = p - level, g - level
    phi_p = 1 - d_p * (d_p >= _CONN_MIN_DISTANCE)
    phi_g = 1 - d_g * (d_g >= _CONN_MIN_DISTANCE)
    return float(np.abs(phi_p - phi_g)[unknown].sum() / 1000)


# --- torchmetrics wrappers --------------------------------------------------------------------


def _as_image_batch(x: torch.Tensor, name: str, role: str) -> np.ndarray:
    """B×1×H×W, B×H×W or H×W tensor → B×H×W NumPy array (floats as float64)."""
    x = torch.as_tensor(x).detach().cpu()
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.ndim == 2:
        x = x[None]
    elif x.ndim != 3:
        raise ValueError(
            f"{name}: expected {role} of shape B×1×H×W, B×H×W or H×W, got {tuple(x.shape)}. "
            "Pass single-channel alphas and trimaps (take channel 0 of an RGB trimap)."
        )
    if x.is_floating_point():
        x = x.to(torch.float64)
    return x.numpy()


class _MattingMetric(Metric):
    """Mean over images of a per-image functional metric; subclasses set ``_metric_fn``."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _metric_fn: Callable[..., float]

    def __init__(self, unknown_value: float = 128, **kwargs: Any):
        super().__init__(**kwargs)
        self.unknown_value = unknown_value
        total = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", default=total, dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gt: torch.Tensor, trimap: torch.Tensor) -> None:
        """Add one batch: each of ``pred``, ``gt`` (float in [0, 1] or uint8) and ``trimap``
        (any numeric dtype, values 0 / unknown / 255) is B×1×H×W, B×H×W or H×W."""
        name = type(self).__name__
        preds = _as_image_batch(pred, name, "pred")
        gts = _as_image_batch(gt, name, "gt")
        trimaps = _as_image_batch(trimap, name, "trimap")
        if not preds.shape == gts.shape == trimaps.shape:
            raise ValueError(
                f"{name}: pred, gt and trimap must hold the same number of images at the same "
                f"resolution; found B×H×W {preds.shape}, {gts.shape}, {trimaps.shape}."
            )
        for p, g, t in zip(preds, gts, trimaps):
            self.total += self._metric_fn(p, g, t, self.unknown_value)
        self.count += len(preds)

    def compute(self) -> torch.Tensor:
        """Mean of the per-image values (float64 scalar tensor)."""
        return self.total / self.count


class SAD(_MattingMetric):
    """Mean over images of :func:`sad`."""

    _metric_fn = staticmethod(sad)


class MSE(_MattingMetric):
    """Mean over images of :func:`mse` (raw, not ×1000)."""

    _metric_fn = staticmethod(mse)


class GradientError(_MattingMetric):
    """Mean over images of :func:`gradient_error`."""

    _metric_fn = staticmethod(gradient_error)


class ConnectivityError(_MattingMetric):
    """Mean over images of :func:`connectivity_error`."""

    _metric_fn = staticmethod(connectivity_error)


def matting_metrics(unknown_value: float = 128) -> MetricCollection:
    """``MetricCollection`` with keys "SAD", "MSE", "Grad", "Conn".

    Compute groups are off: the four metrics share state names, and torchmetrics would merge
    them (and update only one) whenever their first values coincide, e.g. all 0 for a perfect
    first prediction.
    """
    return MetricCollection(
        {
            "SAD": SAD(unknown_value),
            "MSE": MSE(unknown_value),
            "Grad": GradientError(unknown_value),
            "Conn": ConnectivityError(unknown_value),
        },
        compute_groups=False,
    )
