"""YAML → typed config objects, with safe loading and key checking.

Loading uses ``yaml.safe_load``: no tag can construct objects or run code. Every mapping is
checked against the dataclass it becomes: unknown keys are rejected with a suggestion,
missing required keys and values of the wrong type are named with their place.

    distillation:
      - loss: spatial_similarity
        student: layer2
        teacher: layer2
      - loss: channel_similarity
        student: layer2
        teacher: layer2
        adapter: conv1x1
        weight: 1.0
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from kdkit.distiller import DistillTerm
from kdkit.errors import ConfigError

__all__ = [
    "ConfigError",
    "TrainSettings",
    "RunConfig",
    "load_yaml",
    "from_mapping",
    "load_terms",
    "load_run_config",
    "run_config_from_mapping",
    "apply_overrides",
]

T = TypeVar("T")


def load_yaml(source: str | Path) -> Any:
    """Parse a YAML file (a path) or YAML text, safely."""
    path = Path(source) if not isinstance(source, str) or "\n" not in source else None
    try:
        if path is not None and path.exists():
            with open(path, encoding="utf-8") as handle:
                return yaml.safe_load(handle)
        if path is not None and path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"config file not found: {path}")
        return yaml.safe_load(str(source))
    except yaml.YAMLError as error:
        raise ConfigError(f"could not parse YAML ({source if path else 'text'}): {error}") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _matches(value: Any, hint: Any) -> bool:
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # e.g. nn.Module-typed fields: only reachable from Python, not YAML


def from_mapping(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys and value types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, found {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {key!r}.{hint} Valid keys: {', '.join(fields)}"
            )
    missing = [
        name for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}")
    for key, value in data.items():
        if not _matches(value, hints[key]):
            raise ConfigError(
                f"{where}.{key}: expected {_type_name(hints[key])}, found {value!r}"
            )
    return cls(**data)


def load_terms(source: str | Path | list | dict) -> list[DistillTerm]:
    """Distillation terms from YAML (path or text), a list of mappings, or a mapping with a
    ``distillation`` list."""
    data = source if isinstance(source, (list, dict)) else load_yaml(source)
    if isinstance(data, dict):
        if set(data) != {"distillation"}:
            raise ConfigError(
                "expected a 'distillation' list of terms at the top level, found keys: "
                f"{', '.join(map(str, data))}"
            )
        data = data["distillation"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"distillation: expected a non-empty list of terms, found {data!r}")
    return [from_mapping(DistillTerm, item, f"distillation[{i}]") for i, item in enumerate(data)]


@dataclass
class TrainSettings:
    """The ``train:`` section of a run config."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"  # adam | sgd
    schedule: str = "cosine"  # cosine | constant
    grad_clip: float | None = None
    amp: bool = True  # mixed precision: on CUDA; on the CPU only with amp_dtype bf16
    amp_dtype: str = "fp16"  # fp16 (with loss scaling) | bf16
    channels_last: bool = False  # models and 4-D inputs in channels-last memory format
    compile: bool = False  # torch.compile the student's forward
    compile_backend: str = "inductor"  # any torch.compile backend (e.g. aot_eager)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (naming term and step) | skip the step
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: evaluate at the end only
    log_every: int = 10
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"


@dataclass
class RunConfig:
    """A training/evaluation run: which task, model, data, losses, and how to train.

    ``teacher`` (``{model: {...}, checkpoint: PATH}``) and ``distillation`` (a list of
    :class:`DistillTerm` mappings) turn the run into distillation. ``sparsity`` (module-name
    prefix → λ) starts the model from ``γ = 0.5, β = 0`` (frozen) and adds
    ``Σ λ·|γ|`` (DCP's sparsify step). ``model`` may name a pruned model:
    ``{pruned: PATH, reinit: false, <the unpruned model's spec>}``."""

    task: str
    model: dict[str, Any]
    out_dir: str
    data: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    train: TrainSettings = field(default_factory=TrainSettings)
    teacher: dict[str, Any] | None = None
    distillation: list[DistillTerm] | None = None
    sparsity: dict[str, float] | None = None  # BN-γ L1 weight per module-name prefix (DCP)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe), the inverse of :func:`run_config_from_mapping`."""
        data = dataclasses.asdict(self)
        if self.distillation:
            data["distillation"] = [
                {k: v for k, v in dataclasses.asdict(t).items() if v not in (None, {}, False)}
                for t in self.distillation
            ]
        return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to nested mappings."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. train.steps=20")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a mapping")
            node = child
        node[leaf] = yaml.safe_load(raw)
    return data


def run_config_from_mapping(data: Any, where: str = "config") -> RunConfig:
    """Build a :class:`RunConfig`, checking every section."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, found {data!r}")
    data = dict(data)
    train = from_mapping(TrainSettings, data.pop("train", {}) or {}, f"{where}.train")
    terms = data.pop("distillation", None)
    run = from_mapping(RunConfig, data, where)
    run.train = train
    run.distillation = load_terms(terms) if terms else None
    return run


def load_run_config(source: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file, with ``KEY=VALUE`` overrides applied."""
    data = load_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, found {data!r}")
    return run_config_from_mapping(apply_overrides(data, overrides or []), str(source))
