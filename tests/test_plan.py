"""A comparison as independent jobs (issue 19): ``kdkit compare CONFIG --plan FILE`` writes
every entry (teacher, prune jobs, lockstep groups or rows × seeds) with its dependencies and
the command that runs it; those commands, run from two processes at once, give the report
of the same comparison run in one process; an entry refuses to run before its
dependencies, out of range, or with a budget."""

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from test_budget import SPATIAL, toy_compare
from test_compare import PRUNING, compare_config
from test_reliability import ENV
from toy_task import ToyTask

from kdkit.cli import main
from kdkit.compare import comparison_entries, load_compare_config
from kdkit.provenance import kdkit_commit
from kdkit.task import load_task

#: The plan's commands start with ``kdkit``: the console script of this interpreter's venv.
PLAN_ENV = {**ENV, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                            ENV.get("PATH", "")])}
SPARSE = {"model": {"width": 8}, "sparsity": {"body": 1e-4}, "distillation": SPATIAL}
PRUNE = {"sparse": SPARSE, "fractions": {"body": 0.5}, "input_size": [8, 8]}
TOY_PRUNING = {"student": {}, "spatial": {"distillation": SPATIAL}, "pruned": {"prune": PRUNE},
           "pruned-inherit": {"prune": {**PRUNE, "reinit": False}}}


def _kdkit(command: str) -> subprocess.CompletedProcess:
    """Run a command as a plan gives it, in a shell's words."""
    return subprocess.run(shlex.split(command), env=PLAN_ENV, capture_output=True, text=True,
                          timeout=300)


def _start(commands: list[str]) -> subprocess.Popen:
    """One worker process running ``commands`` one after another, stopping at a failure."""
    script = " && ".join(commands)
    return subprocess.Popen(["bash", "-c", script], env=PLAN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _results(cmp: Path) -> list[dict]:
    """The report's rows without its timing columns."""
    with open(cmp / "report" / "results.csv") as handle:
        return [{k: v for k, v in row.items() if "_ms" not in k} for row in csv.DictReader(handle)]


def _training_line(cmp: Path) -> str:
    return next(line for line in (cmp / "report" / "results.md").read_text().splitlines()
                if line.startswith("How the rows were trained"))


def test_the_plan_lists_every_entry_with_its_level_dependencies_and_outputs(tmp_path):
    config = load_compare_config(toy_compare(tmp_path, TOY_PRUNING))
    entries = comparison_entries(config, ToyTask())
    described = [(e.index, e.level, e.describe(), [d.index for d in e.after]) for e in entries]
    assert described == [
        (0, 0, "the teacher", []),
        (1, 1, "sparsify and prune for pruned, pruned-inherit (seed 0)", [0]),
        (2, 1, "train student, spatial (seed 0, in lockstep)", [0]),
        (3, 1, "sparsify and prune for pruned, pruned-inherit (seed 1)", [0]),
        (4, 1, "train student, spatial (seed 1, in lockstep)", [0]),
        (5, 2, "train pruned (seed 0)", [1]),  # a pruned model trains alone
        (6, 2, "train pruned-inherit (seed 0)", [1]),
        (7, 2, "train pruned (seed 1)", [3]),
        (8, 2, "train pruned-inherit (seed 1)", [3]),
    ]
    cmp = tmp_path / "cmp"
    assert entries[0].outputs() == [str(cmp / "teacher")]
    assert entries[4].outputs() == [str(cmp / "student/seed1"), str(cmp / "spatial/seed1")]
    sparse, pruned = entries[1].outputs()
    assert Path(sparse).parent == Path(pruned).parent and Path(sparse).name == "sparse"

    # one row per entry without lockstep; a row without the teacher depends on nothing
    config.lockstep = False
    config.methods = {name: TOY_PRUNING[name] for name in ("student", "spatial")}
    entries = comparison_entries(config, ToyTask())
    assert [(e.describe(), [d.index for d in e.after]) for e in entries] == [
        ("the teacher", []), ("train student (seed 0)", []), ("train student (seed 1)", []),
        ("train spatial (seed 0)", [0]), ("train spatial (seed 1)", [0])]


def test_plan_entries_run_from_two_processes_give_the_sequential_report(tmp_path):
    sequential = tmp_path / "sequential"
    sequential.mkdir()
    alone = _kdkit(f"kdkit compare {toy_compare(sequential)} --quiet")
    assert alone.returncode == 0, alone.stderr

    path, plan_file = toy_compare(tmp_path), tmp_path / "jobs" / "plan.json"
    written = _kdkit(f"kdkit compare {path} --quiet --plan {plan_file}")
    assert written.returncode == 0, written.stderr
    assert "3 entries (level 0: entry 0; level 1: entries 1-2)" in written.stdout
    plan = json.loads(plan_file.read_text())
    assert plan["report"] == f"kdkit compare {path} --quiet"
    assert [(e["kind"], e["seed"], e["rows"], e["depends_on"], e["command"])
            for e in plan["entries"]] == [
        ("teacher", None, ["teacher"], [], f"kdkit compare {path} --quiet --entry 0"),
        ("train", 0, ["student", "spatial"], [0], f"kdkit compare {path} --quiet --entry 1"),
        ("train", 1, ["student", "spatial"], [0], f"kdkit compare {path} --quiet --entry 2")]

    # level by level, the level's entries split between two processes (as two GPUs would)
    for level in plan["levels"]:
        commands = [e["command"] for e in plan["entries"] if e["level"] == level["level"]]
        workers = [_start(commands[0::2]), _start(commands[1::2] or ["true"])]
        for worker in workers:
            _, stderr = worker.communicate(timeout=300)
            assert worker.returncode == 0, stderr
    cmp = tmp_path / "cmp"
    logs = {log: log.read_text() for log in cmp.glob("**/log.jsonl")}
    assert len(logs) == 5  # the teacher and two rows of two seeds

    again = _kdkit(plan["entries"][1]["command"])  # a finished entry is left as it is
    assert again.returncode == 0 and "has finished already: nothing to do" in again.stdout
    report = _kdkit(plan["report"])
    assert report.returncode == 0, report.stderr
    assert {log: log.read_text() for log in logs} == logs  # nothing retrained
    assert _results(cmp) == _results(sequential / "cmp")
    finished = re.compile(r", finished [0-9: -]+ UTC")  # the two ran at different times
    assert finished.sub("", _training_line(cmp)) == \
        finished.sub("", _training_line(sequential / "cmp"))
    assert "in lockstep (seed 1, group 1" in _training_line(cmp)


def test_prune_entries_and_pruned_rows_run_as_entries_and_the_report_retrains_nothing(
        tmp_path, capsys):
    """DCP rows of the matting test comparison, one entry at a time in this process: the
    pruned rows wait for their prune job, which waits for the teacher."""
    path = str(compare_config(tmp_path))
    (tmp_path / "methods.yaml").write_text(yaml.safe_dump(PRUNING, sort_keys=False))
    entries = comparison_entries(load_compare_config(path), load_task("matting"))
    assert [(e.kind, e.level, [d.index for d in e.after]) for e in entries] == [
        ("teacher", 0, []), ("train", 0, []), ("prune", 1, [0]), ("train", 2, [0, 2]),
        ("train", 2, [0, 2])]
    assert main(["compare", path, "--quiet", "--entry", "3"]) == 2
    assert "depends on entries 0, 2, and these have not finished: entry 0" in \
        capsys.readouterr().err
    for index in range(len(entries)):
        assert main(["compare", path, "--quiet", "--entry", str(index)]) == 0
    assert "finished; 5 of 5 entries have" in capsys.readouterr().out
    cmp = tmp_path / "cmp"
    logs = {log: log.read_text() for log in cmp.glob("**/log.jsonl")}
    assert len(logs) == 5  # the teacher, the student, the sparsify run, two pruned rows
    assert main(["compare", path, "--quiet"]) == 0
    assert {log: log.read_text() for log in logs} == logs
    with open(cmp / "report" / "results.csv") as handle:
        assert [r["method"] for r in csv.DictReader(handle)] == [
            "teacher", "student", "dcp", "dcp-inherit"]
    assert (f"alone (a pruned model), kdkit {kdkit_commit()}: dcp (seed 0), "
            "dcp-inherit (seed 0)") in _training_line(cmp)


def test_a_row_added_to_a_finished_comparison_says_why_it_trained_alone(tmp_path):
    """The new row joins its seed's lockstep group, whose other rows have finished: it
    trains alone, and the report says that is why (not that no row shares its data)."""
    rows = {"student": {}, "spatial": {"distillation": SPATIAL}}
    path = str(toy_compare(tmp_path, rows, seeds=[0]))
    assert main(["compare", path, "--quiet"]) == 0
    toy_compare(tmp_path, {**rows, "spatial-x2": {"distillation": [{**SPATIAL[0], "weight": 2.0}]}},
                seeds=[0])
    assert main(["compare", path, "--quiet"]) == 0
    line = _training_line(tmp_path / "cmp")
    assert "in lockstep (seed 0, group 1" in line and "student (seed 0), spatial (seed 0)" in line
    assert ("alone (the other rows of its lockstep group had finished before it), "
            f"kdkit {kdkit_commit()}: spatial-x2 (seed 0)") in line


def test_rows_added_later_in_lockstep_are_told_apart_from_the_first_group(tmp_path,
                                                                          monkeypatch):
    """Two rows added to a finished comparison train in lockstep with each other, not with
    the first group: the report names two groups (by when each finished) and the commit
    each trained with."""
    times = iter(["2026-12-01 10:00:00", "2026-12-01 11:00:00"])

    class Clock:
        @staticmethod
        def now(zone):
            return datetime.fromisoformat(next(times)).replace(tzinfo=zone)

    monkeypatch.setattr("kdkit.compare_plan.datetime", Clock)
    commits = iter(["first", "second"])  # one look per training entry, before it trains
    monkeypatch.setattr("kdkit.compare_plan.kdkit_commit", lambda: next(commits))
    rows = {"student": {}, "spatial": {"distillation": SPATIAL}}
    path = str(toy_compare(tmp_path, rows, seeds=[0]))
    assert main(["compare", path, "--quiet"]) == 0
    heavier = {f"spatial-x{k}": {"distillation": [{**SPATIAL[0], "weight": float(k)}]}
               for k in (2, 3)}
    toy_compare(tmp_path, {**rows, **heavier}, seeds=[0])
    assert main(["compare", path, "--quiet"]) == 0
    line = _training_line(tmp_path / "cmp")
    for finished, commit, names in (
            ("10:00", "first", "student (seed 0), spatial (seed 0)"),
            ("11:00", "second", "spatial-x2 (seed 0), spatial-x3 (seed 0)")):
        assert (f"in lockstep (seed 0, group 1, finished 2026-12-01 {finished}:00 UTC: one "
                f"data stream, one teacher forward per batch; its train ms/step is the whole "
                f"group's), kdkit {commit}: {names}") in line


def test_an_entry_refuses_to_run_before_its_dependencies_or_out_of_range(tmp_path, capsys):
    path = str(toy_compare(tmp_path))
    assert main(["compare", path, "--entry", "2"]) == 2
    error = capsys.readouterr().err
    assert "entry 2 (train student, spatial (seed 1, in lockstep)) depends on entry 0," in error
    assert f"entry 0 (the teacher): kdkit compare {path} --entry 0" in error
    assert "--dependency=afterok" in error
    assert not (tmp_path / "cmp" / "student").exists()  # nothing trained

    assert main(["compare", path, "--entry", "3"]) == 2
    assert "the comparison has 3 entries, 0 to 2" in capsys.readouterr().err
    assert main(["compare", path, "--entry", "-1"]) == 2
    assert "the comparison has 3 entries" in capsys.readouterr().err


@pytest.mark.parametrize("budget", [["--budget", "8m"], ["--set", "budget=8m"]])
def test_a_comparison_with_a_budget_has_no_plan(tmp_path, capsys, budget):
    path = str(toy_compare(tmp_path))
    for job in (["--plan", str(tmp_path / "plan.json")], ["--entry", "0"]):
        assert main(["compare", path, *budget, *job]) == 2
        error = capsys.readouterr().err
        assert "a comparison with a time budget (8m) cannot be split" in error
        assert "Remove budget: (or --budget)" in error
    assert not (tmp_path / "plan.json").exists() and not (tmp_path / "cmp").exists()


def test_plan_and_entry_are_one_or_the_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["compare", str(toy_compare(tmp_path)), "--plan", "p.json", "--entry", "0"])
    assert exit.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_the_plan_commands_carry_the_comparisons_options(tmp_path):
    path = toy_compare(tmp_path)
    plan_file = tmp_path / "plan.json"
    assert main(["compare", str(path), "--set", "seeds=[3]", "--out", str(tmp_path / "o"),
                 "--w2", "0.1", "10", "--no-lockstep", "--plan", str(plan_file)]) == 0
    plan = json.loads(plan_file.read_text())
    options = (f"--set 'seeds=[3]' --out {tmp_path / 'o'} --w2 0.1 10.0 --no-lockstep")
    assert plan["report"] == f"kdkit compare {path} {options}"
    rows = [(e["rows"], e["seed"], e["command"]) for e in plan["entries"]]
    assert rows[:3] == [(["teacher"], None, f"kdkit compare {path} {options} --entry 0"),
                        (["student"], 3, f"kdkit compare {path} {options} --entry 1"),
                        (["spatial@w2=0.1"], 3, f"kdkit compare {path} {options} --entry 2")]
    assert plan["out_dir"] == str(tmp_path / "o") and len(rows) == 4
