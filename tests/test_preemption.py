"""Graceful stop (issue 19): SIGTERM, SIGINT and SIGUSR1 finish the step in flight, save a
checkpoint, log ``kind: interrupted`` and exit with 128 + the signal; the same command then
resumes to the weights of an uninterrupted run, with no step lost (the run below would
otherwise keep no checkpoint at all: ``checkpoint_every`` is past its end)."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from test_lockstep import toy_rows
from test_reliability import ENV, _weights, toy_run

from kdkit.checkpoint import load_checkpoint
from kdkit.cli import resume_command
from kdkit.compare_plan import _stop_between_runs
from kdkit.config import run_config_from_mapping
from kdkit.errors import Interrupted
from kdkit.train import read_log
from kdkit.training.lockstep import train_lockstep
from kdkit.training.stop import REQUEST, stop_signals

STEPS = 600


def _config(tmp_path: Path, name: str) -> dict:
    """A dropout run (its steps draw from the run's random stream) with no checkpoint
    before its end."""
    run = toy_run(tmp_path / name, steps=STEPS, schedule="constant", checkpoint_every=10_000)
    return {**run, "task": "dropout_task:DropoutTask"}


def _start(config: dict, path: Path) -> subprocess.Popen:
    """``kdkit train`` in a child whose SIGINT has its default action (a child started from
    a shell's background job would inherit SIGINT ignored)."""
    path.write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        [sys.executable, "-m", "kdkit", "train", str(path), "--quiet", "--no-resume"],
        env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_step(out: Path, step: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not any(r["step"] >= step for r in read_log(out, "train")):
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The weights of the run trained to its end in one child process."""
    folder = tmp_path_factory.mktemp("whole")
    process = _start(_config(folder, "whole"), folder / "whole.yaml")
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return _weights(folder / "whole")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_a_signal_checkpoints_and_the_same_command_resumes_to_the_same_weights(
        tmp_path, signum, uninterrupted):
    config = _config(tmp_path, "stopped")
    out = Path(config["out_dir"])
    process = _start(config, tmp_path / "stopped.yaml")
    _wait_for_step(out, 20, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr
    [interrupted] = read_log(out, "interrupted")
    step = interrupted["step"]
    assert 20 <= step < STEPS and interrupted["signal"] == signal.Signals(signum).name
    assert load_checkpoint(out / "checkpoint.pt")["step"] == step  # no step lost
    assert not (out / "model.pt").exists()
    [line] = stderr.strip().splitlines()
    assert f"stopped by {signal.Signals(signum).name} at step {step} of {STEPS}" in line
    assert line.endswith(f"resume with: kdkit train {tmp_path / 'stopped.yaml'} --quiet")
    resumed = subprocess.run(  # the command the line gives, run as the child was
        [sys.executable, "-m", "kdkit", "train", str(tmp_path / "stopped.yaml"), "--quiet"],
        env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    for name, value in uninterrupted.items():
        assert torch.equal(_weights(out)[name], value), name


def test_the_resume_command_drops_no_resume():
    assert resume_command(["train", "a b.yaml", "--no-resume", "--quiet"]) == \
        "kdkit train 'a b.yaml' --quiet"


def test_signals_are_recorded_while_active_and_the_handlers_restored_after():
    before = signal.getsignal(signal.SIGUSR1)
    with stop_signals() as request, stop_signals():
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing
        assert request.signal == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == request.record
    assert signal.getsignal(signal.SIGUSR1) is before and REQUEST.signal is None


def test_a_signal_between_two_runs_of_a_comparison_stops_it():
    with stop_signals():
        _stop_between_runs()  # nothing received: carry on
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(Interrupted, match="between two runs") as error:
            _stop_between_runs()
    assert error.value.signal == signal.SIGTERM


def test_a_lockstep_group_checkpoints_every_row_and_resumes_to_the_same_weights(tmp_path):
    """SIGTERM mid-way through two rows in lockstep: both checkpoint at the same step, and
    the group run again ends where the uninterrupted group does."""
    from toy_task import ToyTask

    steps = 80  # the toy's weights turn subnormal (slow on a CPU) after about 100 steps

    def rows_in(folder: Path) -> list:
        return [run_config_from_mapping({**r.to_dict(), "train": {
            **r.to_dict()["train"], "checkpoint_every": 10_000}}) for r in toy_rows(folder, steps)]

    whole = rows_in(tmp_path / "whole")
    train_lockstep(whole, ToyTask(), progress=False)
    rows = rows_in(tmp_path / "stopped")
    first = Path(rows[0].out_dir)

    def send_when_running():
        while not any(r["step"] >= 10 for r in read_log(first, "train")):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_when_running, daemon=True)
    sender.start()
    with pytest.raises(Interrupted, match="stopped by SIGTERM"):
        train_lockstep(rows, ToyTask(), progress=False)
    sender.join()
    stopped = {load_checkpoint(Path(r.out_dir) / "checkpoint.pt")["step"] for r in rows}
    assert len(stopped) == 1 and 10 <= stopped.pop() < steps
    train_lockstep(rows, ToyTask(), progress=False)
    for done, reference in zip(rows, whole):
        for name, value in _weights(Path(reference.out_dir)).items():
            assert torch.equal(_weights(Path(done.out_dir))[name], value), name


def _worker_of_rank(parent: int, rank: int) -> int:
    """The pid of ``torchrun``'s (``parent``'s) worker process with ``RANK=rank``."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and \
                    f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers in /proc")
def test_under_torchrun_a_signal_to_one_process_stops_every_process_at_one_step(tmp_path):
    """SIGUSR1 to rank 1 alone (rank 0 writes the log): both processes stop at the same step
    (else the checkpoint's gathering collective would hang), and the run resumes to the
    uninterrupted run's weights."""
    def config(name: str) -> Path:
        run = toy_run(tmp_path / name, steps=STEPS, batch_size=2, schedule="constant",
                      checkpoint_every=10_000)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**run, "task": "dropout_task:DropoutTask"}))
        return path

    started = []

    def torchrun(path: Path) -> subprocess.Popen:
        started.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             "--nproc_per_node=2", "-m", "kdkit", "train", str(path), "--quiet"],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True))
        return started[-1]

    try:
        _stop_one_process_of_two(tmp_path, config, torchrun)
    finally:  # processes stopped at different steps would wait in a collective for ever
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)


def _stop_one_process_of_two(tmp_path: Path, config, torchrun) -> None:
    whole = torchrun(config("whole"))
    assert whole.wait(timeout=300) == 0, whole.stderr.read()[-3000:]
    process = torchrun(config("stopped"))
    out = tmp_path / "stopped"
    _wait_for_step(out, 20, process)
    os.kill(_worker_of_rank(process.pid, 1), signal.SIGUSR1)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    [interrupted] = read_log(out, "interrupted")
    assert interrupted["signal"] == "SIGUSR1" and 20 <= interrupted["step"] < STEPS
    assert load_checkpoint(out / "checkpoint.pt")["step"] == interrupted["step"]
    resumed = torchrun(config("stopped"))
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()[-3000:]
    reference = _weights(tmp_path / "whole")
    for name, value in _weights(out).items():
        torch.testing.assert_close(value, reference[name], rtol=1e-5, atol=1e-6)
