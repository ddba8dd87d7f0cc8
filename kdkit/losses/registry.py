"""The registry of losses by name: :func:`register_loss` is the one way in (each loss
module class is decorated where it is defined), :func:`build_loss` the way out."""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from kdkit.errors import ConfigError

__all__ = ["LOSSES", "UnknownLossError", "register_loss", "build_loss"]

LOSSES: dict[str, type[nn.Module]] = {}


class UnknownLossError(ConfigError, KeyError):
    """A loss name that is not registered; the message lists the registered ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def register_loss(name: str):
    """Class decorator: make the loss module ``cls`` buildable as ``name`` (in configs and
    :class:`~kdkit.distiller.DistillTerm`). A name taken by another class is refused."""

    def add(cls: type[nn.Module]) -> type[nn.Module]:
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(
                f"a loss named {name!r} is already registered ({LOSSES[name].__module__}."
                f"{LOSSES[name].__qualname__}); register {cls.__qualname__} under another name")
        LOSSES[name] = cls
        return cls

    return add


def _loss_class(name: str) -> type[nn.Module]:
    if name not in LOSSES:
        close = difflib.get_close_matches(name, LOSSES, n=3, cutoff=0.4)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        registered = ", ".join(sorted(LOSSES))
        raise UnknownLossError(f"unknown loss {name!r}; registered: {registered}.{hint}")
    return LOSSES[name]


def build_loss(name: str, **kwargs) -> nn.Module:
    """The registered loss ``name`` built with ``kwargs``. Keywords the constructor does not
    take raise a :class:`~kdkit.errors.ConfigError` listing those it does; an error raised
    inside the constructor passes through with its own traceback."""
    cls = _loss_class(name)
    signature = inspect.signature(cls)
    try:
        signature.bind(**kwargs)
    except TypeError as error:
        accepted = ", ".join(signature.parameters) or "none"
        raise ConfigError(
            f"bad arguments for loss {name!r}: {error}; it takes: {accepted}") from error
    return cls(**kwargs)
