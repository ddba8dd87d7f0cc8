"""Distiller: a frozen teacher, a student, and weighted distillation terms.

    terms = [
        DistillTerm("spatial_similarity", student="layer2", teacher="layer2"),
        DistillTerm("channel_similarity", student="layer2", teacher="layer2", adapter="conv1x1"),
        DistillTerm("hinton", student="output", teacher="output", args={"temperature": 4}),
    ]
    distiller = Distiller(teacher, student, terms, example_inputs=x[:2])
    optimizer = torch.optim.SGD(distiller.trainable_parameters(), lr=0.1)
    out = distiller(x)
    (task_loss(out.student_output, y) + out.losses["total"]).backward()

Features are taken by module name with forward hooks (:mod:`kdkit.capture`), so both
models run unchanged. ``"output"`` refers to a model's own output. What the Distiller asks
of a loss module is :class:`kdkit.losses.DistillationLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from kdkit.adapters import build_adapter
from kdkit.capture import (
    FeatureRecorder,
    FeatureRef,
    UnknownModuleError,
    resolve_module,
    unwrap_model,
)
from kdkit.errors import ConfigError, NonFiniteLossError
from kdkit.losses import bind_teacher, build_loss, takes_lists

__all__ = ["DistillTerm", "Distiller", "DistillerOutput", "OUTPUT", "TeacherPass",
           "record_teacher", "shared_teacher_recorder"]

OUTPUT = "output"  # a feature reference meaning the model's own output


@dataclass
class DistillTerm:
    """One weighted distillation loss between student and teacher features.

    Attributes:
        loss: a registered loss name (:data:`kdkit.losses.LOSSES`) or a loss module.
        student: module name(s) of the student features (``"output"``: the model output;
            ``"name[k]"``: the k-th call of a module that runs several times).
        teacher: the matching teacher module name(s).
        adapter: an adapter kind (:mod:`kdkit.adapters`) applied to each student feature.
        weight: multiplies the loss.
        args: keyword arguments for the registered loss.
        name: the key in the loss dict; by default ``"<loss>:<student>"``.
        clone: copy the recorded features (needed when an in-place op follows the module).
    """

    loss: str | nn.Module
    student: str | list[str]
    teacher: str | list[str]
    adapter: str | None = None
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    clone: bool = False

    def refs(self, role: str) -> list[str]:
        """The feature references on the ``"student"`` or ``"teacher"`` side."""
        refs = self.student if role == "student" else self.teacher
        return [refs] if isinstance(refs, str) else list(refs)

    def display_name(self) -> str:
        if self.name:
            return self.name
        loss = self.loss if isinstance(self.loss, str) else type(self.loss).__name__
        return f"{loss}:{'+'.join(self.refs('student'))}"


_NON_FINITE_FIXES = {
    "teacher": "check the teacher's weights (a checkpoint that loaded NaN) and the inputs",
    "student": "the student diverged or received it (lower the learning rate, clip "
               "gradients, check the inputs; with fp16 autocast, try bf16)",
    "loss": "check the loss's arguments and the term's adapter, and the features' scale "
            "(overflow in half precision)",
}


class DistillerOutput(NamedTuple):
    """``student_output``: the student's output; ``losses``: each term's weighted loss by
    name plus their ``"total"``; ``teacher_output``: the teacher's output (no grad)."""

    student_output: Any
    losses: dict[str, torch.Tensor]
    teacher_output: Any


class TeacherPass(NamedTuple):
    """The frozen teacher's forward on one batch: ``output`` and ``features``, the recorded
    tensors by feature reference (detached)."""

    output: Any
    features: dict[str, torch.Tensor]


def record_teacher(teacher: nn.Module, recorder: FeatureRecorder, refs: list[str],
                   args: tuple, kwargs: dict) -> TeacherPass:
    """The :class:`TeacherPass` of ``teacher`` on the inputs, without gradients, keeping
    ``refs`` from ``recorder`` (initialised on ``teacher``)."""
    with torch.no_grad(), recorder:
        output = teacher(*args, **kwargs)
    return TeacherPass(output, {ref: recorder[ref] for ref in refs})


def shared_teacher_recorder(teacher: nn.Module, distillers: Sequence[Distiller]) -> tuple:
    """(a recorder on ``teacher`` of every teacher feature that ``distillers`` name, those
    references): one teacher pass for several students (cloned where any term clones)."""
    refs = list(dict.fromkeys(r for d in distillers for r in d.feature_refs("teacher")[0]))
    cloned = [r for d in distillers for r in d.feature_refs("teacher")[1]]
    recorder = FeatureRecorder(refs, detach=True, clone=cloned)
    return recorder.initialize(teacher, "teacher"), refs


def _require_separate_models(teacher: nn.Module, student: nn.Module) -> None:
    """The teacher is frozen, so a student that is the teacher, or shares parameters with
    it, would be frozen too: refuse both."""
    fix = "pass a separate teacher, e.g. teacher = copy.deepcopy(model)"
    if unwrap_model(teacher) is unwrap_model(student):
        raise ConfigError(
            "the teacher and the student are the same module; the Distiller freezes the "
            f"teacher (requires_grad=False), so the student would never train: {fix}")
    teacher_parameters = {id(p) for p in teacher.parameters()}
    shared = [n for n, p in student.named_parameters() if id(p) in teacher_parameters]
    if shared:
        raise ConfigError(
            f"the student shares {len(shared)} parameter(s) with the teacher "
            f"({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}); the Distiller "
            f"freezes the teacher, so they would never train: {fix}")


def _require_one_device(teacher: nn.Module, student: nn.Module) -> None:
    devices = {role: {p.device for p in model.parameters()}
               for role, model in (("teacher", teacher), ("student", student))}
    if devices["teacher"] and devices["student"] and devices["teacher"] != devices["student"]:
        raise ConfigError(
            f"the teacher is on {sorted(map(str, devices['teacher']))} but the student on "
            f"{sorted(map(str, devices['student']))}; move both to one device "
            "(teacher.to(device), student.to(device)) before building the Distiller")


def _float_tensors(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors in ``value`` (a tensor, or a model output's nesting)."""
    return [t for t in tree_leaves(value)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _non_finite(value: Any) -> str | None:
    """``"NaN"`` or ``"infinite values"`` when a tensor in ``value`` holds them, else None
    (synchronises with the device: for the error path only)."""
    tensors = _float_tensors(value)
    if any(bool(torch.isnan(t).any()) for t in tensors):
        return "NaN"
    if any(not bool(torch.isfinite(t).all()) for t in tensors):
        return "infinite values"
    return None


class Distiller(nn.Module):
    """Runs teacher and student on the same inputs and computes the weighted terms.

    The teacher stays in eval mode with gradients off, so its BatchNorm statistics never
    change; the teacher and the student must be separate modules sharing no parameter.
    Module names are resolved at construction (unknown names raise, listing close matches).
    With ``example_inputs`` the adapters are sized and every term's feature shapes are
    checked at construction; without, adapters must be unneeded and shapes are checked by
    the first forward. Adapters live in :attr:`adapters`: one ``ModuleList`` per term, in
    term order (empty where a term has none); :meth:`adapters_of` finds them
    by term name.

    ``check_finite=True`` checks every term's features and weighted loss after each
    forward (one device-to-host synchronisation per step) and raises a
    :class:`~kdkit.errors.NonFiniteLossError` naming the first term with a NaN or
    infinity, the feature and whether the teacher or the student produced it, or that the
    features were finite and the loss itself was not. Off (the default), the forward never
    synchronises.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        terms: Sequence[DistillTerm],
        example_inputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        check_finite: bool = False,
    ):
        super().__init__()
        if not terms:
            raise ConfigError("a Distiller needs at least one DistillTerm")
        _require_separate_models(teacher, student)
        _require_one_device(teacher, student)
        self.check_finite = check_finite
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.terms = list(terms)
        self.term_names = [t.display_name() for t in self.terms]
        duplicates = sorted({n for n in self.term_names if self.term_names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"term names must be unique; repeated: {', '.join(duplicates)} (give each "
                "term its own name)")
        self.losses = nn.ModuleList(
            t.loss if isinstance(t.loss, nn.Module) else build_loss(t.loss, **t.args)
            for t in self.terms
        )
        self._teacher_recorder = self._recorder(teacher, "teacher")
        self._student_recorder = self._recorder(student, "student")
        for term, loss in zip(self.terms, self.losses):
            bind_teacher(loss, [self._teacher_module(r) for r in term.refs("teacher")])
        self.adapters = nn.ModuleList(nn.ModuleList() for _ in self.terms)
        if example_inputs is not None:
            self._build_adapters_and_check(example_inputs)
        elif any(t.adapter for t in self.terms):
            raise ConfigError(
                "adapters are sized from the features: pass example_inputs (a small batch "
                "of real inputs) to Distiller(...)"
            )

    def adapters_of(self, term_name: str) -> nn.ModuleList:
        """The adapters of the term called ``term_name`` (one per student feature)."""
        if term_name not in self.term_names:
            raise KeyError(f"no term named {term_name!r}; terms: {', '.join(self.term_names)}")
        return self.adapters[self.term_names.index(term_name)]

    def _teacher_module(self, ref: str) -> nn.Module:
        """The teacher module a reference names (the teacher itself for ``"output"``)."""
        if ref == OUTPUT:
            return unwrap_model(self.teacher)
        return resolve_module(self.teacher, FeatureRef.parse(ref).name, "teacher")

    def feature_refs(self, role: str) -> tuple[list[str], list[str]]:
        """(every feature reference of the ``"student"`` or ``"teacher"`` side of the terms,
        ``"output"`` left out; those to clone)."""
        names = [ref for term in self.terms for ref in term.refs(role) if ref != OUTPUT]
        cloned = [ref for term in self.terms if term.clone for ref in term.refs(role)
                  if ref != OUTPUT]
        return list(dict.fromkeys(names)), list(dict.fromkeys(cloned))

    def _recorder(self, model: nn.Module, role: str) -> FeatureRecorder:
        """A recorder of every module that ``role``'s side of the terms names."""
        for term, term_name in zip(self.terms, self.term_names):
            for ref in term.refs(role):
                try:
                    if ref != OUTPUT:
                        resolve_module(model, FeatureRef.parse(ref).name, role)
                except UnknownModuleError as error:
                    raise UnknownModuleError(f"term {term_name!r}: {error}") from None
        names, cloned = self.feature_refs(role)
        # the student's hooks stay registered, so a compiled student sees the same hooks
        # on every step (recording only inside the Distiller's forward)
        recorder = FeatureRecorder(names, detach=role == "teacher", clone=cloned,
                                   persistent=role == "student")
        return recorder.initialize(model, role)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, adapter and loss parameters that require grad (not the teacher's)."""
        modules = (self.student, self.adapters, self.losses)
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def teacher_pass(self, *args, **kwargs) -> TeacherPass:
        """The teacher's forward on the inputs, without gradients: its output and the
        features the terms name (what :meth:`student_losses` takes)."""
        return record_teacher(self.teacher, self._teacher_recorder,
                              self.feature_refs("teacher")[0], args, kwargs)

    def _student_forward(self, args: tuple, kwargs: dict) -> Any:
        with self._student_recorder:
            return self.student(*args, **kwargs)

    def _features(self, refs: list[str], recorder: FeatureRecorder, output: Any) -> list:
        return [output if ref == OUTPUT else recorder[ref] for ref in refs]

    def _term_features(self, index: int, student_output: Any, teacher: TeacherPass):
        term = self.terms[index]
        student = self._features(term.refs("student"), self._student_recorder, student_output)
        teacher = [teacher.output if ref == OUTPUT else teacher.features[ref]
                   for ref in term.refs("teacher")]
        if len(student) != len(teacher):
            raise ConfigError(
                f"term {self.term_names[index]!r}: {len(student)} student feature(s) but "
                f"{len(teacher)} teacher feature(s); list matching layers on both sides"
            )
        return student, teacher

    def _term_loss(self, index: int, student: list, teacher: list) -> torch.Tensor:
        name = self.term_names[index]
        if len(self.adapters[index]):
            student = [adapter(f) for adapter, f in zip(self.adapters[index], student)]
        loss = self.losses[index]
        try:
            return loss(student, teacher) if takes_lists(loss) else loss(student[0], teacher[0])
        except ConfigError as error:
            raise ConfigError(f"term {name!r}: {error}") from error
        except ValueError as error:  # a user's loss: its own type, with the term noted
            error.add_note(f"in distillation term {name!r}")
            raise

    def _build_adapters_and_check(self, example_inputs) -> None:
        args = tuple(example_inputs) if isinstance(example_inputs, (list, tuple)) else (
            example_inputs,
        )
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                teacher_pass = self.teacher_pass(*args)
                student_output = self._student_forward(args, {})
                for i, term in enumerate(self.terms):
                    student, teacher = self._term_features(i, student_output, teacher_pass)
                    if term.adapter:
                        self.adapters[i].extend(
                            build_adapter(term.adapter, s.shape[1], t.shape[1]).to(
                                s.device, s.dtype
                            )
                            for s, t in zip(student, teacher)
                        )
                    self._term_loss(i, student, teacher)
        finally:
            self.student.train(was_training)

    def forward(self, *args, **kwargs) -> DistillerOutput:
        """Run both models on the same inputs; returns a :class:`DistillerOutput`
        (:meth:`teacher_pass`, then :meth:`student_losses`)."""
        return self.student_losses(self.teacher_pass(*args, **kwargs), *args, **kwargs)

    def student_losses(self, teacher: TeacherPass, *args, **kwargs) -> DistillerOutput:
        """Run the student on the inputs and compute every term against ``teacher``, the
        :class:`TeacherPass` of the same inputs (this distiller's own, or one shared by
        several students: :func:`record_teacher`)."""
        student_output = self._student_forward(args, kwargs)
        losses: dict[str, torch.Tensor] = {}
        features = []
        for i, (term, name) in enumerate(zip(self.terms, self.term_names)):
            student, teacher_features = self._term_features(i, student_output, teacher)
            losses[name] = term.weight * self._term_loss(i, student, teacher_features)
            features.append((student, teacher_features))
        if self.check_finite:
            self._check_finite(losses, features)
        losses["total"] = sum(losses.values())
        return DistillerOutput(student_output, losses, teacher.output)

    def _check_finite(self, losses: dict[str, torch.Tensor], features: list) -> None:
        """Raise :class:`NonFiniteLossError` for the first term whose features
        (``features[i]``: its student and teacher lists) or weighted loss are not finite;
        one synchronisation when all are."""
        tensors = _float_tensors((losses, features))
        if bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return
        for i, name in enumerate(self.term_names):
            problem = self._term_problem(i, features[i], losses[name])
            if problem:
                raise NonFiniteLossError(f"term {name!r}: {problem}")

    def _term_problem(self, index: int, features: tuple, loss: torch.Tensor) -> str | None:
        """What is not finite in one term, in words, or None."""
        term = self.terms[index]
        student, teacher = features
        for role, values in (("teacher", teacher), ("student", student)):
            for ref, value in zip(term.refs(role), values):
                found = _non_finite(value)
                if found:
                    return (f"the {role}'s feature {ref!r} holds {found}; "
                            + _NON_FINITE_FIXES[role])
        found = _non_finite(loss)
        if found:
            return (f"the features are finite but the loss (weight {term.weight}) is {found}; "
                    + _NON_FINITE_FIXES["loss"])
        return None
