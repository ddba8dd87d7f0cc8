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
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from kdkit.distiller import DistillTerm

__all__ = ["ConfigError", "load_yaml", "from_mapping", "load_terms"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A config that does not match its schema; the message says where and why."""


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
