"""A comparison as entries: the units of work ``kdkit compare`` does before its report.

An entry is the training of the teacher (when the comparison trains it), one DCP prune job
(a sparsify run and its pruned model, shared by the methods that differ only in
``reinit``), or the training of one unit of one seed's rows: a lockstep group
(:func:`training_groups`), or one row that trains alone. Each entry lists the entries it
depends on (the teacher for whatever uses it; a prune job for its pruned rows) and has a
level: 0 without dependencies, else one more than its deepest dependency. Entries are
numbered level by level, so each level is one contiguous range of indices.

``kdkit compare`` runs every entry in order in one process (:func:`run_entries`);
``kdkit compare CONFIG --plan FILE`` writes them (:func:`plan_document`), with the command
that runs each (``--entry I``, :func:`run_one`), so a scheduler can run them as independent
jobs into the comparison's folders. Every run folder is claimed by the process training it
(:mod:`kdkit.training.claim`), and how each run was trained is kept in its own folder
(:data:`HOW`, read by :func:`training_notes`), so entries never write one shared file.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kdkit.config import RunConfig
from kdkit.dcp import prune_run
from kdkit.distributed import World, end_world, setup_world
from kdkit.errors import Interrupted, PlanError
from kdkit.provenance import kdkit_commit
from kdkit.task import Task
from kdkit.train import train
from kdkit.training.claim import claim
from kdkit.training.folder import RunFolder, resume_problems
from kdkit.training.lockstep import (
    alone_reason,
    lockstep_chunks,
    lockstep_groups,
    row_key,
    train_lockstep,
)
from kdkit.training.run import resolve_device, uses_teacher
from kdkit.training.runlog import read_log
from kdkit.training.stop import REQUEST, signal_name

__all__ = ["HOW", "PLAN_FORMAT", "Entry", "finished", "plan_document", "plan_entries",
           "run_entries", "run_one", "training_chunks", "training_groups", "training_notes"]

HOW = "how_trained.json"  # in each run folder: how the comparison trained it (lockstep or alone)
PLAN_FORMAT = 1  # of the document --plan writes


@dataclass(eq=False)
class Entry:
    """One unit of work: ``kind`` ``teacher`` (``runs``: the teacher's run), ``prune``
    (``job``: the prune job; ``rows``: the rows that use its model) or ``train``
    (``runs``: the rows of ``seed`` trained together, ``group``: the unit's number among
    the seed's); ``after``: the entries it depends on."""

    kind: str
    rows: list[str]
    seed: int | None = None
    runs: list[RunConfig] = field(default_factory=list)
    job: dict | None = None
    group: int = 0
    after: list[Entry] = field(default_factory=list)
    level: int = 0
    index: int = 0

    def describe(self) -> str:
        """``"the teacher"``, ``"prune for dcp, dcp-inherit (seed 1)"``, ``"train
        student, spatial (seed 0, in lockstep)"``."""
        if self.kind == "teacher":
            return "the teacher"
        names = ", ".join(self.rows)
        if self.kind == "prune":
            return f"sparsify and prune for {names} (seed {self.seed})"
        together = ", in lockstep" if len(self.runs) > 1 else ""
        return f"train {names} (seed {self.seed}{together})"

    def outputs(self) -> list[str]:
        """The run folders (and a prune job's model file) the entry makes."""
        if self.kind == "prune":
            return [self.job["sparse"]["out_dir"], self.job["output"]]
        return [run.out_dir for run in self.runs]


def finished(run: RunConfig) -> bool:
    """Whether ``run``'s folder holds it finished: its final weights and final evaluation,
    made with this config (up to what :mod:`kdkit.training.folder` deems safe to change).
    A folder made with another config is not finished: :func:`kdkit.train.train` then
    resumes it or says which keys differ."""
    folder = RunFolder(Path(run.out_dir), writes=False)
    saved = folder.saved_config() if folder.weights.exists() else None
    return (saved is not None and not resume_problems(saved, run, run.train.steps)
            and any(r["step"] == run.train.steps for r in read_log(folder.path, "eval")))


def _pruned(job: dict) -> bool:
    """Whether a prune job is done: its summary, written after the model, exists."""
    return Path(job["output"]).with_suffix(".json").exists()


def entry_finished(entry: Entry) -> bool:
    """Whether everything ``entry`` makes is there (its runs finished, its model pruned)."""
    return _pruned(entry.job) if entry.kind == "prune" else all(map(finished, entry.runs))


def training_groups(configs: list[RunConfig], lockstep: bool) -> list[list[RunConfig]]:
    """The units ``configs`` (rows of one seed) train in: their lockstep groups
    (:func:`kdkit.training.lockstep.lockstep_groups`), or one row each with ``lockstep:
    false``. A group may be split further to fit a device (:func:`training_chunks`)."""
    if not lockstep:
        return [[c] for c in configs]
    return [[configs[i] for i in group] for group in lockstep_groups(list(map(row_key, configs)))]


def training_chunks(group: list[RunConfig], task: Task,
                    world: World | None = None) -> list[list[RunConfig]]:
    """``group`` (one of :func:`training_groups`) in chunks that fit ``world``'s device
    (:func:`kdkit.training.lockstep.lockstep_chunks`; one chunk on the CPU). Without
    ``world``, one is joined for the measurement only when the group has several rows (a
    row alone needs no process group)."""
    if len(group) == 1:
        return [group]
    if world is not None:
        return lockstep_chunks(group, task, world)
    world = setup_world(resolve_device(group[0].train.device))
    try:
        return lockstep_chunks(group, task, world)
    finally:
        end_world(world)


def plan_entries(teacher: RunConfig | None, runs: list[tuple], jobs: dict,
                 lockstep: bool) -> list[Entry]:
    """The entries of a comparison, numbered level by level (in the order of ``runs``
    within a level): ``teacher``, its run when trained here; ``runs``, (label, seed, run
    config) of every row and seed; ``jobs``, {run folder: its prune job or None}."""
    first = [] if teacher is None else [Entry("teacher", ["teacher"], runs=[teacher])]
    entries = list(first)
    for seed in dict.fromkeys(seed for _, seed, _ in runs):
        rows = {run.out_dir: label for label, s, run in runs if s == seed}
        entries += _seed_entries(seed, rows, [run for _, s, run in runs if s == seed], jobs,
                                 first, lockstep)
    return _numbered(entries)


def _seed_entries(seed: int, rows: dict[str, str], configs: list[RunConfig], jobs: dict,
                  teacher: list[Entry], lockstep: bool) -> list[Entry]:
    """The prune jobs and training units of one seed's rows (``rows``: {run folder:
    label}); ``teacher``: the teacher's entry, or none."""
    prunes: dict[str, Entry] = {}
    for run in configs:
        job = jobs[run.out_dir]
        if job is not None:
            needs = teacher if "teacher" in job["sparse"] else []
            prune = prunes.setdefault(job["output"],
                                      Entry("prune", [], seed, job=job, after=list(needs)))
            prune.rows.append(rows[run.out_dir])
    units = []
    for number, group in enumerate(training_groups(configs, lockstep), 1):
        pruned = sorted({jobs[run.out_dir]["output"] for run in group if jobs[run.out_dir]})
        needs = teacher if any(map(uses_teacher, group)) else []
        units.append(Entry("train", [rows[run.out_dir] for run in group], seed, runs=group,
                           group=number, after=[*needs, *(prunes[o] for o in pruned)]))
    return [*prunes.values(), *units]


def _numbered(entries: list[Entry]) -> list[Entry]:
    """``entries`` (each after those it depends on) with their levels, sorted by level
    (stable) and indexed."""
    for entry in entries:
        entry.level = 1 + max((e.level for e in entry.after), default=-1)
    entries = sorted(entries, key=lambda e: e.level)
    for index, entry in enumerate(entries):
        entry.index = index
    return entries


def _write_how(run: RunConfig, how: str, commit: str) -> None:
    """Record in ``run``'s folder how it was trained and by which kdkit ``commit``
    (atomically: written, then renamed)."""
    path = Path(run.out_dir) / HOW
    temporary = path.with_name(f".{HOW}.{os.getpid()}")
    temporary.write_text(json.dumps({"how": how, "kdkit": commit}))
    os.replace(temporary, path)


def _how_alone(run: RunConfig, lockstep: bool, group_finished: bool) -> str:
    """Why ``run`` trained alone; ``group_finished``: the other rows of its lockstep group
    had finished before it (a row added to a finished comparison)."""
    if not lockstep:
        return "alone (lockstep: false)"
    if group_finished:
        return "alone (the other rows of its lockstep group had finished before it)"
    reason = alone_reason(run) or "no other row shares its data, seed, batch size and " \
                                  "teacher, or the device fits one row at a time"
    return f"alone ({reason})"


def _train_unit(entry: Entry, todo: list[RunConfig], task: Task, lockstep: bool,
                progress: bool) -> None:
    """Train ``todo`` (the unfinished rows of a ``train`` entry) in chunks that fit the
    device, recording how each trained."""
    labels = {run.out_dir: label for label, run in zip(entry.rows, entry.runs)}
    commit = kdkit_commit()  # before training: the checkout may move on during a long run
    chunks = training_chunks(todo, task)
    for part, chunk in enumerate(chunks, 1):
        _stop_between_runs()
        names = ", ".join(labels[run.out_dir] for run in chunk)
        if len(chunk) == 1:
            if progress:
                print(f"training {names} (seed {entry.seed}) → {chunk[0].out_dir}")
            train(chunk[0], task, progress=progress)
            _write_how(chunk[0], _how_alone(chunk[0], lockstep,
                                            len(todo) == 1 < len(entry.runs)), commit)
            continue
        if progress:
            print(f"training in lockstep (seed {entry.seed}): {names}")
        train_lockstep(chunk, task, progress=progress)
        split = f", chunk {part} of {len(chunks)}" if len(chunks) > 1 else ""
        finished = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        for run in chunk:  # the time tells a group from one of rows added to it later
            _write_how(run, f"in lockstep (seed {entry.seed}, group {entry.group}{split}, "
                            f"finished {finished}: one "
                            "data stream, one teacher forward per batch; its train ms/step is "
                            "the whole group's)", commit)


def run_entry(entry: Entry, task: Task, lockstep: bool, progress: bool) -> None:
    """Make what ``entry`` makes and has not finished (finished runs are reused)."""
    if entry.kind == "prune":
        if not _pruned(entry.job):
            if progress:
                print(f"sparsifying and pruning for {', '.join(entry.rows)} "
                      f"(seed {entry.seed})")
            folder = Path(entry.job["output"]).parent
            folder.mkdir(parents=True, exist_ok=True)
            with claim(folder):
                prune_run(entry.job, task, progress=progress)
        return
    todo = [run for run in entry.runs if not finished(run)]
    if progress:
        for run in entry.runs:
            if run not in todo:
                print(f"reusing {run.out_dir}")
    if entry.kind == "teacher" and todo:
        if progress:
            print(f"training the teacher → {todo[0].out_dir}")
        train(todo[0], task, progress=progress)
    elif todo:
        _train_unit(entry, todo, task, lockstep, progress)


def _stop_between_runs() -> None:
    """Raise :class:`Interrupted` when a stop signal came after the last run finished."""
    if REQUEST.signal is not None:
        raise Interrupted(f"stopped by {signal_name(REQUEST.signal)} between two runs; every "
                          "finished run is kept", REQUEST.signal)


def run_entries(entries: list[Entry], task: Task, lockstep: bool, progress: bool) -> None:
    """Run every entry in order (each after those it depends on), in this process."""
    for entry in entries:
        _stop_between_runs()
        run_entry(entry, task, lockstep, progress)


def _command(argv: list[str], index: int | None = None) -> str:
    """The shell command ``kdkit ARGV`` (with ``--entry index``)."""
    return shlex.join(["kdkit", *argv, *([] if index is None else ["--entry", str(index)])])


def _unmet(entry: Entry, argv: list[str]) -> PlanError:
    """The refusal of ``entry`` while some of its dependencies have not finished."""
    noun = "entry" if len(entry.after) == 1 else "entries"
    missing = "; ".join(f"entry {e.index} ({e.describe()}): {_command(argv, e.index)}"
                        for e in entry.after if not entry_finished(e))
    return PlanError(
        f"entry {entry.index} ({entry.describe()}) depends on {noun} "
        f"{', '.join(str(e.index) for e in entry.after)}, and these have not finished: "
        f"{missing}. Run them first; under a scheduler, start level {entry.level} after the "
        "jobs of the levels before it have succeeded (SLURM: --dependency=afterok:<job id>, "
        "see docs/compare.md)")


def run_one(entries: list[Entry], index: int, task: Task, lockstep: bool, argv: list[str],
            progress: bool) -> str:
    """Run entry ``index`` (``argv``: the comparison's ``kdkit`` arguments, for the
    commands the messages give); returns what was done, in one line. An index out of
    range, or an entry whose dependencies have not finished, is a :class:`PlanError`; a
    finished entry is left as it is."""
    if not 0 <= index < len(entries):
        raise PlanError(f"--entry {index}: the comparison has {len(entries)} entries, 0 to "
                        f"{len(entries) - 1}; `{_command([*argv, '--plan', 'plan.json'])}` "
                        "lists them")
    entry = entries[index]
    if entry_finished(entry):
        return f"entry {index} ({entry.describe()}) has finished already: nothing to do"
    if not all(map(entry_finished, entry.after)):
        raise _unmet(entry, argv)
    run_entry(entry, task, lockstep, progress)
    done = sum(map(entry_finished, entries))
    return (f"entry {index} ({entry.describe()}) finished; {done} of {len(entries)} entries "
            f"have. When all have, `{_command(argv)}` writes the report")


def plan_document(entries: list[Entry], argv: list[str], out_dir: str) -> dict:
    """The plan as JSON-ready data: the command of every entry and of the report, the
    index range of each level, and each entry's kind, rows, seed, outputs and
    dependencies."""
    levels: dict[int, list[int]] = {}
    for entry in entries:
        levels.setdefault(entry.level, []).append(entry.index)
    return {
        "format": PLAN_FORMAT, "cwd": os.getcwd(), "out_dir": out_dir,
        "report": _command(argv),
        "levels": [{"level": level, "first": indices[0], "last": indices[-1]}
                   for level, indices in levels.items()],
        "entries": [{"index": e.index, "level": e.level, "kind": e.kind, "seed": e.seed,
                     "rows": e.rows, "lockstep": len(e.runs) > 1, "outputs": e.outputs(),
                     "depends_on": [d.index for d in e.after],
                     "command": _command(argv, e.index)} for e in entries],
    }


def training_notes(runs: list[tuple]) -> list[str]:
    """The report's line on how, and with which kdkit commit, the rows were trained (from
    each run folder's :data:`HOW`)."""
    rows: dict[str, list[str]] = {}
    for label, seed, run in runs:
        record = Path(run.out_dir) / HOW
        if record.exists():
            found = json.loads(record.read_text())
            how = f"{found['how']}, kdkit {found.get('kdkit', 'commit not recorded')}"
        else:
            how = "not recorded (trained before kdkit kept this record)"
        rows.setdefault(how, []).append(f"{label} (seed {seed})")
    return ["How the rows were trained: " + "; ".join(f"{how}: {', '.join(names)}"
                                                    for how, names in rows.items()) + "."]
