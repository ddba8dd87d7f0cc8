"""Shape checks shared by the losses: each failure says what must agree, what was
found, and how to fix it."""

from __future__ import annotations

import torch

from kdkit.errors import ConfigError


def _dims(t: torch.Tensor) -> str:
    return "×".join(str(d) for d in t.shape)


def require_min_dims(loss: str, t: torch.Tensor, role: str, ndim: int, layout: str) -> None:
    """``t`` must have at least ``ndim`` dimensions (``layout`` names them, e.g. 'B×C×H×W')."""
    if t.dim() < ndim:
        raise ConfigError(f"{loss}: the {role} must be {layout}; found shape {_dims(t)}")


def require_match(
    loss: str, what: str, student: torch.Tensor, teacher: torch.Tensor, dims: slice | int, fix: str
) -> None:
    """``student.shape[dims]`` must equal ``teacher.shape[dims]``."""
    s = student.shape[dims]
    t = teacher.shape[dims]
    if s != t:
        raise ConfigError(
            f"{loss}: student and teacher must have the same {what}; found student "
            f"{_dims(student)} and teacher {_dims(teacher)}. {fix}"
        )


def require_positive_temperature(loss: str, temperature: float) -> None:
    """A softmax temperature must be positive."""
    if temperature <= 0:
        raise ConfigError(f"{loss}: temperature must be positive, got {temperature}")


def require_logits(loss: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    """Class logits ``B×K`` or ``B×K×H×W``, the same shape for student and teacher."""
    require_min_dims(loss, student, "student logits", 2, "B×K or B×K×H×W")
    require_match(
        loss, "logit shape", student, teacher, slice(None),
        "Both models must predict the same classes at the same resolution.",
    )
