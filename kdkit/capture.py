"""Record the outputs (or inputs) of named submodules with forward hooks.

Any ``nn.Module`` works unchanged: features are taken by dotted module name
(``"layer2"``, ``"encoder.block3.pool"``), so models need not return them.

    recorder = FeatureRecorder(["layer2", "layer3"]).initialize(model)
    with recorder:
        model(x)
    f2 = recorder["layer2"]          # the last call's output
    first = recorder.get("layer2", call=0)

A feature reference may carry a call index, ``"blocks.0[1]"``: the second call of
a module that runs several times in one forward (shared weights, recurrence).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import torch
from torch import nn

from kdkit.errors import ConfigError, FeatureError, KdkitError

__all__ = ["FeatureRecorder", "FeatureRef", "UnknownModuleError", "unwrap_model", "resolve_module"]

_REF_PATTERN = re.compile(r"^(?P<name>[^\[\]]*?)(?:\[(?P<call>-?\d+)\])?$")


class UnknownModuleError(KdkitError, KeyError):
    """A module name that the model does not have; the message lists close matches. A
    :class:`~kdkit.errors.KdkitError` (the command line prints it in one line) and, for
    code that caught it before, a ``KeyError``."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class FeatureRef:
    """A module name plus which of its calls to use (``-1``: the last)."""

    name: str
    call: int = -1

    @classmethod
    def parse(cls, text: str) -> FeatureRef:
        """``"layer2"`` → (layer2, last call); ``"blocks.0[1]"`` → (blocks.0, call 1)."""
        match = _REF_PATTERN.match(text.strip())
        if match is None:
            raise ConfigError(
                f"bad feature reference {text!r}: expected a dotted module name, optionally "
                "followed by a call index in brackets, e.g. 'layer2' or 'blocks.0[1]'"
            )
        call = match.group("call")
        return cls(match.group("name"), -1 if call is None else int(call))

    def __str__(self) -> str:
        return self.name if self.call == -1 else f"{self.name}[{self.call}]"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DataParallel / DistributedDataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, so module names match the user's model."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def resolve_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule of (unwrapped) ``model`` called ``name``; an unknown name raises an
    :class:`UnknownModuleError` that lists the closest valid names."""
    model = unwrap_model(model)
    modules = dict(model.named_modules())
    key = _strip_wrapper_prefixes(name)
    if key in modules and key != "":
        return modules[key]
    valid = [n for n in modules if n]
    close = difflib.get_close_matches(key, valid, n=5, cutoff=0.5)
    hint = f"closest valid names: {', '.join(close)}" if close else (
        f"valid names include: {', '.join(valid[:12])}" + (" ..." if len(valid) > 12 else "")
    )
    raise UnknownModuleError(
        f"{role} ({type(model).__name__}) has no submodule named {name!r}; {hint}. "
        "List them all with [n for n, _ in model.named_modules()]."
    )


class _Record:
    """One recorded tensor and the version counter it had when recorded."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: torch.Tensor, version: int | None):
        self.tensor = tensor
        self.version = version


def _version_of(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


class FeatureRecorder:
    """Records module outputs (``source="output"``) or first positional inputs
    (``source="input"``) of named submodules while it is entered.

    Args:
        names: dotted module names (a call index suffix such as ``"[1]"`` is allowed
            and ignored here: every call is recorded).
        source: ``"output"`` or ``"input"``.
        detach: detach recorded tensors (the teacher side).
        clone: copy recorded tensors (``True``, or the names to copy). Needed when an
            in-place op that follows the module (e.g. ``ReLU(inplace=True)``) overwrites its
            output; without it such a record is detected on access and rejected, never
            returned corrupted.

        persistent: keep the hooks registered after the first ``__enter__`` (recording
            only while entered) instead of adding and removing them each time; a model
            compiled with ``torch.compile`` then sees the same hooks on every call.
            :meth:`remove` takes them off.

    Records are cleared on every ``__enter__``; every call of a module is kept, in order.
    """

    def __init__(
        self,
        names: list[str] | tuple[str, ...],
        source: str = "output",
        detach: bool = False,
        clone: bool | list[str] | tuple[str, ...] = False,
        persistent: bool = False,
    ):
        if source not in ("output", "input"):
            raise ValueError(f"source must be 'output' or 'input', got {source!r}")
        parsed = (_strip_wrapper_prefixes(FeatureRef.parse(n).name) for n in names)
        self.names = list(dict.fromkeys(parsed))
        self.source = source
        self.detach = detach
        if isinstance(clone, bool):
            self._cloned = set(self.names) if clone else set()
        else:
            self._cloned = {_strip_wrapper_prefixes(FeatureRef.parse(n).name) for n in clone}
        self._modules: dict[str, nn.Module] | None = None
        self._handles: list = []
        self.persistent, self._active = persistent, False
        self._records: dict[str, list[_Record]] = {n: [] for n in self.names}

    def initialize(self, model: nn.Module, role: str = "model") -> FeatureRecorder:
        """Resolve every name on ``model`` (wrappers unwrapped); unknown names raise."""
        self._modules = {n: resolve_module(model, n, role) for n in self.names}
        return self

    def __enter__(self) -> FeatureRecorder:
        if self._modules is None:
            raise RuntimeError("FeatureRecorder.initialize(model) must be called before use")
        if self._active:
            raise RuntimeError("FeatureRecorder is already active (nested 'with' on one recorder)")
        for records in self._records.values():
            records.clear()
        if not self._handles:
            for name, module in self._modules.items():
                if self.source == "output":
                    handle = module.register_forward_hook(self._output_hook(name))
                else:
                    handle = module.register_forward_pre_hook(self._input_hook(name))
                self._handles.append(handle)
        self._active = True
        return self

    def __exit__(self, *exc) -> None:
        self._active = False
        if not self.persistent:
            self.remove()

    def remove(self) -> None:
        """Take the hooks off the model (they are added again on the next ``__enter__``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _store(self, name: str, value) -> None:
        if not isinstance(value, torch.Tensor):
            raise FeatureError(
                f"module {name!r} produced a {type(value).__name__}, not a tensor; record a "
                "submodule whose output is a single tensor"
            )
        if self.detach:
            value = value.detach()
        version = _version_of(value)
        if name in self._cloned or version is None:  # inference tensors have no version counter
            value, version = value.clone(), None  # a private copy cannot be overwritten
        self._records[name].append(_Record(value, version))

    def _output_hook(self, name: str):
        def hook(module, inputs, output):
            if self._active:
                self._store(name, output)

        return hook

    def _input_hook(self, name: str):
        def hook(module, inputs):
            if not self._active:
                return
            if not inputs:
                raise FeatureError(f"module {name!r} was called without positional inputs; "
                                   "record its output instead (source='output')")
            self._store(name, inputs[0])

        return hook

    def calls(self, name: str) -> int:
        """How many times ``name`` ran since the recorder was last entered."""
        return len(self._records[self._known(name)])

    def get(self, name: str, call: int = -1) -> torch.Tensor:
        """The tensor recorded at call ``call`` of module ``name`` (``-1``: the last)."""
        records = self._records[self._known(name)]
        if not records:
            raise FeatureError(
                f"module {name!r} did not run during the recorded forward pass; check that "
                "the model's forward actually calls it for this input"
            )
        try:
            record = records[call]
        except IndexError:
            raise FeatureError(
                f"module {name!r} ran {len(records)} time(s); call index {call} is out of range"
            ) from None
        if record.version is not None and record.tensor._version != record.version:
            raise FeatureError(
                f"the recorded {self.source} of {name!r} was modified in place after it was "
                "recorded (typically by a following ReLU(inplace=True) or an in-place add), so "
                "it no longer holds the module's value. Record it with clone=True (on a "
                "distillation term: 'clone: true'), or make the following op out of place."
            )
        return record.tensor

    def __getitem__(self, ref: str) -> torch.Tensor:
        parsed = FeatureRef.parse(ref)
        return self.get(parsed.name, parsed.call)

    def _known(self, name: str) -> str:
        if name not in self._records:
            raise KeyError(f"{name!r} is not recorded; recorded names: {', '.join(self.names)}")
        return name
