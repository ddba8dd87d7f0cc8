"""YAML → typed config objects, with safe loading and key, type and range checking.

Loading uses :class:`ConfigLoader`, PyYAML's safe loader (no tag can construct objects or
run code) reading floats as Python writes them: ``2e-3``, ``1E5``, ``1.5e+3``, ``.5`` and
``-.5`` are floats (YAML 1.1 reads the first ones as strings), ints stay ints, and ``.inf``
/ ``.nan`` are YAML's spellings of infinity and NaN (plain ``inf`` / ``nan`` stay strings).
Every mapping is checked against the dataclass it becomes: unknown keys are rejected with a
suggestion; missing required keys, values of the wrong type, NaN or infinite numbers and
values outside a field's range (:data:`FIELD_CHECKS`) are named by their key path
(``train.steps``) with the value found and what to set instead.

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
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from kdkit.data.workers import NumWorkers
from kdkit.distiller import DistillTerm
from kdkit.errors import ConfigError

__all__ = [
    "FIELD_CHECKS",
    "ConfigError",
    "ConfigLoader",
    "OneOf",
    "Range",
    "TrainSettings",
    "RunConfig",
    "load_yaml",
    "from_mapping",
    "load_terms",
    "load_run_config",
    "run_config_from_mapping",
    "apply_overrides",
    "TEACHER_PREFIX",
    "distill_steps",
    "ground_truth_weights",
    "register_checks",
]

T = TypeVar("T")

#: Task loss weights named ``teacher_X`` weigh the term ``X`` against the teacher's
#: prediction (:class:`kdkit.task.Task`).
TEACHER_PREFIX = "teacher_"


_FLOAT_TAG = "tag:yaml.org,2002:float"
_INT_TAG = "tag:yaml.org,2002:int"

#: Python's float literals and YAML's ``.inf`` / ``.nan``; a dot or an exponent is required,
#: so ints stay ints.
_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.VERBOSE)
#: Python's decimal and hexadecimal int literals: no YAML 1.1 octal (``017`` is 15 there)
#: and no sexagesimal ints (``1:30`` is 90 there); both stay strings.
_INT = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+)$")


class ConfigLoader(yaml.SafeLoader):
    """The safe loader with YAML 1.1's number rules replaced by Python's (:data:`_FLOAT`,
    :data:`_INT`): ``2e-3`` is a float, and ``017``, ``1:30`` and ``1:30.5`` stay strings."""


ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_FLOAT_TAG, _INT_TAG)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
ConfigLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))
ConfigLoader.add_implicit_resolver(_INT_TAG, _INT, list("-+0123456789"))


def _parse(text: Any, what: str) -> Any:
    """YAML text or an open file through :class:`ConfigLoader`; ``what`` names it in errors."""
    try:
        return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ConfigError(f"could not parse YAML ({what}): {error}") from None


def load_yaml(source: str | Path) -> Any:
    """Parse a YAML file (a path) or YAML text, safely (:class:`ConfigLoader`)."""
    path = Path(source) if not isinstance(source, str) or "\n" not in source else None
    if path is not None and path.exists():
        with open(path, encoding="utf-8") as handle:
            return _parse(handle, str(path))
    if path is not None and path.suffix in (".yaml", ".yml"):
        raise ConfigError(f"config file not found: {path}")
    return _parse(str(source), str(source) if path else "text")


def _key(where: str, key: str | int) -> str:
    """The key path of ``key`` inside ``where`` (``train`` + ``steps`` → ``train.steps``)."""
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


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
        keys, values = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _matches(k, keys) and _matches(v, values) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # e.g. nn.Module-typed fields: only reachable from Python, not YAML


def _leaves(value: Any, key: str):
    """``(key path, value)`` of every scalar inside ``value`` (mappings and lists opened)."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _leaves(item, _key(key, name))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _leaves(item, _key(key, index))
    else:
        yield key, value


def _require_finite(value: Any, key: str) -> None:
    """No NaN or infinite number anywhere inside ``value``."""
    for path, leaf in _leaves(value, key):
        if isinstance(leaf, float) and not math.isfinite(leaf):
            raise ConfigError(f"{path}: found {leaf}, but NaN and infinite values are not "
                              f"allowed; set {path} to a finite number")


@dataclass(frozen=True)
class Range:
    """Numbers from ``low`` (excluded when ``open_low``) to ``high``; ``None``: unbounded.
    ``note`` (e.g. ``"0: at the end only"``) ends the error message."""

    low: float | None = None
    high: float | None = None
    open_low: bool = False
    note: str = ""

    def allows(self, value: Any) -> bool:
        if self.low is not None and (value <= self.low if self.open_low else value < self.low):
            return False
        return self.high is None or value <= self.high

    def problem(self, key: str, value: Any) -> str:
        bounds = [f"{'>' if self.open_low else '>='} {self.low:g}"] if self.low is not None else []
        bounds += [f"<= {self.high:g}"] if self.high is not None else []
        wanted = " and ".join(bounds)
        note = f" ({self.note})" if self.note else ""
        return (f"{key}: expected a number {wanted}, found {value!r}; set {key} to a value "
                f"{wanted}{note}")


@dataclass(frozen=True)
class OneOf:
    """One of the strings ``choices``."""

    choices: tuple[str, ...]

    def allows(self, value: Any) -> bool:
        return value in self.choices

    def problem(self, key: str, value: Any) -> str:
        close = difflib.get_close_matches(str(value), self.choices, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        leaf = key.rsplit(".", 1)[-1]
        return (f"{key}: unknown {leaf} {value!r}.{hint} Valid values: "
                f"{', '.join(self.choices)}")


#: Per dataclass, the range or choice each checked field must satisfy; :func:`from_mapping`
#: applies them to the field's value, or to every value inside it (a mapping's values, a
#: list's items); ``None`` (an unset optional field) is never checked. Add to it with
#: :func:`register_checks`.
FIELD_CHECKS: dict[type, dict[str, Range | OneOf]] = {}


def register_checks(cls: type, **checks: Range | OneOf) -> None:
    """Check ``cls``'s fields (by name) whenever :func:`from_mapping` builds ``cls``."""
    unknown = set(checks) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    FIELD_CHECKS.setdefault(cls, {}).update(checks)


def _check_ranges(cls: type, data: dict, where: str) -> None:
    for name, check in FIELD_CHECKS.get(cls, {}).items():
        for path, leaf in _leaves(data.get(name), _key(where, name)):
            if leaf is not None and not check.allows(leaf):
                raise ConfigError(check.problem(path, leaf))


def from_mapping(cls: type[T], data: Any, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking keys, value types, finiteness and
    the ranges of :data:`FIELD_CHECKS`; ``where`` is the mapping's key path in errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of {cls.__name__} fields, "
                          f"found {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where or 'config'}: unknown key {key!r}.{hint} Valid keys: "
                f"{', '.join(fields)}"
            )
    missing = [
        name for name, f in fields.items()
        if name not in data
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s): {', '.join(missing)}")
    for key, value in data.items():
        _require_finite(value, _key(where, key))
        if not _matches(value, hints[key]):
            hint = (f"; write it as an integer ({int(value)})"
                    if isinstance(value, float) and value.is_integer() else "")
            raise ConfigError(
                f"{_key(where, key)}: expected {_type_name(hints[key])}, found {value!r}{hint}"
            )
    _check_ranges(cls, data, where)
    return cls(**data)


def load_terms(source: str | Path | list | dict,
               where: str = "distillation") -> list[DistillTerm]:
    """Distillation terms from YAML (path or text), a list of mappings, or a mapping with a
    ``distillation`` list; ``where`` is the list's key path in errors."""
    data = source if isinstance(source, (list, dict)) else load_yaml(source)
    if isinstance(data, dict):
        if set(data) != {"distillation"}:
            raise ConfigError(
                "expected a 'distillation' list of terms at the top level, found keys: "
                f"{', '.join(map(str, data))}"
            )
        data = data["distillation"]
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{where}: expected a non-empty list of terms, found {data!r}")
    return [from_mapping(DistillTerm, item, _key(where, i)) for i, item in enumerate(data)]


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
    channels_last: bool = True  # models and 4-D inputs in channels-last memory format
    compile: bool = False  # torch.compile the student's forward
    compile_backend: str = "inductor"  # any torch.compile backend (e.g. aot_eager)
    on_nonfinite: str = "stop"  # a NaN/inf loss: stop (naming term and step) | skip the step
    checkpoint_every: int = 500
    eval_every: int = 0  # 0: evaluate at the end only
    log_every: int = 10
    seed: int = 0
    num_workers: int | str = 0  # data loader processes, or "auto": the usable cores minus one
    device: str = "auto"
    log: list[str] = field(default_factory=lambda: ["jsonl"])  # jsonl | tensorboard


@dataclass
class RunConfig:
    """A training/evaluation run: which task, model, data, losses, and how to train.

    ``teacher`` (``{model: {...}, checkpoint: PATH}``) and ``distillation`` (a list of
    :class:`DistillTerm` mappings) turn the run into distillation. ``sparsity`` (module-name
    prefix → λ) starts the model from ``γ = 0.5, β = 0`` (frozen) and adds
    ``Σ λ·|γ|`` (DCP's sparsify step). ``model`` may name a pruned model:
    ``{pruned: PATH, reinit: false, <the unpruned model's spec>}``. ``distill_until`` (a
    fraction of ``train.steps``) stops using the teacher after that share of the steps: from
    then on only the task's ground-truth terms train the student, each ``teacher_X`` weight
    moved onto ``X`` (see :func:`distill_steps`, :func:`ground_truth_weights`)."""

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
    distill_until: float | None = None  # share of train.steps that use the teacher

    def to_dict(self) -> dict[str, Any]:
        """Plain data (YAML-safe), the inverse of :func:`run_config_from_mapping`."""
        data = dataclasses.asdict(self)
        if self.distillation:
            data["distillation"] = [
                {k: v for k, v in dataclasses.asdict(t).items() if v not in (None, {}, False)}
                for t in self.distillation
            ]
        return data


register_checks(
    TrainSettings,
    steps=Range(1, note="the number of optimizer steps"),
    batch_size=Range(1),
    lr=Range(0, open_low=True),
    weight_decay=Range(0),
    optimizer=OneOf(("adam", "sgd")),
    schedule=OneOf(("cosine", "constant")),
    grad_clip=Range(0, open_low=True, note="or null for no clipping"),
    amp_dtype=OneOf(("fp16", "bf16")),
    on_nonfinite=OneOf(("stop", "skip")),
    checkpoint_every=Range(0, note="0: at the end only"),
    eval_every=Range(0, note="0: at the end only"),
    log_every=Range(1),
    num_workers=NumWorkers(),
    log=OneOf(("jsonl", "tensorboard")),
)
register_checks(
    RunConfig,
    sparsity=Range(0, note="the L1 weight on BatchNorm γ per prefix"),
    distill_until=Range(0, 1, open_low=True,
                        note="the share of train.steps that use the teacher; 1: all of them"),
)
register_checks(DistillTerm, weight=Range(
    0, note="a negative weight rewards moving away from the teacher; 0 switches a term off"))


def ground_truth_weights(loss: dict[str, Any]) -> dict[str, Any]:
    """The ``loss:`` weights after a run stops distilling: each ``teacher_X`` weight (a task
    term against the teacher's prediction, :class:`kdkit.task.Task`) moves onto ``X``, the
    same term against the ground truth, and becomes 0 (``alpha: 0.5, teacher_alpha: 0.5``
    → ``alpha: 1.0, teacher_alpha: 0``: the plain student's loss)."""
    weights = dict(loss)
    for name, weight in loss.items():
        if name.startswith(TEACHER_PREFIX) and weight:
            target = name[len(TEACHER_PREFIX):]
            weights[target] = weights[target] + weight
            weights[name] = 0.0
    return weights


def distill_steps(run: RunConfig) -> int:
    """How many of ``run``'s first steps use its teacher: ``⌈distill_until · train.steps⌉``
    (at least one), all of them without ``distill_until``; 0 without a teacher."""
    if run.teacher is None:
        return 0
    if run.distill_until is None:
        return run.train.steps
    return max(1, math.ceil(run.distill_until * run.train.steps))


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
        node[leaf] = _parse(raw, f"--set {item}")
    return data


def run_config_from_mapping(data: Any, where: str = "") -> RunConfig:
    """Build a :class:`RunConfig`, checking every section; ``where`` is the key path of
    ``data`` in errors (``""``: the top level, so keys read ``train.steps``)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, found {data!r}")
    data = dict(data)
    train = from_mapping(TrainSettings, data.pop("train", {}) or {}, _key(where, "train"))
    terms = data.pop("distillation", None)
    run = from_mapping(RunConfig, data, where)
    run.train = train
    run.distillation = load_terms(terms, _key(where, "distillation")) if terms else None
    if run.distill_until is not None:
        if run.teacher is None:
            key = _key(where, "distill_until")
            raise ConfigError(f"{key}: this run has no teacher, so there is no distillation "
                              f"to stop; remove {key}, or add a teacher: section and the "
                              "terms to distil (distillation:, or a task loss such as "
                              "teacher_alpha)")
        _check_ground_truth_weights(run.loss, where)
    return run


def _check_ground_truth_weights(loss: dict[str, Any], where: str) -> None:
    """Each non-zero ``teacher_X`` weight needs ``X`` in ``loss:`` for
    :func:`ground_truth_weights` to move it onto (the task's default for ``X`` is not
    known here)."""
    for name, weight in loss.items():
        target = name[len(TEACHER_PREFIX):]
        if name.startswith(TEACHER_PREFIX) and weight and target not in loss:
            raise ConfigError(
                f"{_key(where, 'loss')}: distill_until moves {name}'s weight onto {target} "
                f"once the run stops distilling, but loss.{target} is not set; set "
                f"loss.{target} (its weight against the ground truth) explicitly")


def load_run_config(source: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """A :class:`RunConfig` from a YAML file, with ``KEY=VALUE`` overrides applied."""
    data = load_yaml(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, found {data!r}")
    return run_config_from_mapping(apply_overrides(data, overrides or []))
