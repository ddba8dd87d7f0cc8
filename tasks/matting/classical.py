"""Classical, training-free matting baselines from pymatting (MIT licence): closed-form
matting (Levin et al. 2008) and KNN matting (Chen et al. 2013), as the matting task's
training-free methods for ``kdkit compare`` rows ``{training_free: closed_form}``.

Each maps a batch of one test sample (``image`` ``1×3×H×W`` in [0, 1], ``trimap``
``1×1×H×W`` with 0 / 128 / 255) to a ``1×1×H×W`` alpha on the batch's device, with the
trimap's known pixels 0 and 1. pymatting's numba kernels compile when it is first imported
(about 40 s on a 2-core CPU) and cache on disk, so later processes import in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["ClassicalMatting", "classical_methods"]


@dataclass
class ClassicalMatting:
    """One pymatting estimator (``estimate_alpha_cf`` or ``estimate_alpha_knn``) with its
    ``laplacian_kwargs``; ``version`` (pymatting's version and the settings) keys the
    comparison's cache."""

    estimator: str
    laplacian_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def version(self) -> str:
        import pymatting

        return f"pymatting {pymatting.__version__} {self.estimator} {self.laplacian_kwargs}"

    def _estimate(self) -> Callable:
        import pymatting  # imported when first used: its first import compiles (numba)

        return getattr(pymatting, self.estimator)

    def __call__(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``1×1×H×W`` alpha in [0, 1] of the batch's one sample."""
        image = batch["image"][0].permute(1, 2, 0).double().cpu().numpy()  # H×W×3 in [0, 1]
        trimap = batch["trimap"][0, 0].double().cpu().numpy() / 255  # 0, 128/255 or 1
        alpha = self._estimate()(np.ascontiguousarray(image), trimap,
                                 laplacian_kwargs=self.laplacian_kwargs)
        alpha = np.where(trimap == 0, 0.0, np.where(trimap == 1, 1.0, np.clip(alpha, 0, 1)))
        return torch.from_numpy(alpha).float()[None, None].to(batch["image"].device)


def classical_methods() -> dict[str, ClassicalMatting]:
    """``closed_form`` (pymatting's defaults: 3×3 windows, ε = 1e-7) and ``knn``
    (pymatting's defaults: n_neighbors [20, 10], distance_weights [2, 0.1])."""
    return {"closed_form": ClassicalMatting("estimate_alpha_cf"),
            "knn": ClassicalMatting("estimate_alpha_knn")}
