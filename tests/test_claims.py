"""A run folder is trained by one process at a time (issue 19): its claim is an flock on
``.claim`` that the kernel releases when the holder dies, so a live claim refuses a second
trainer and a dead one's claim is taken over."""

import json
import signal
import subprocess
import sys
import time

import pytest
import yaml
from test_reliability import ENV, MATTING

from kdkit.errors import RunFolderError
from kdkit.train import read_log
from kdkit.training.claim import CLAIM, claim


def test_a_held_claim_refuses_a_second_holder_and_is_emptied_at_the_end(tmp_path):
    with claim(tmp_path) as stale:
        assert stale is None
        record = json.loads((tmp_path / CLAIM).read_text())
        with pytest.raises(RunFolderError, match=f"pid {record['pid']} on host"):
            with claim(tmp_path):
                pass
    assert (tmp_path / CLAIM).read_text() == ""
    with claim(tmp_path) as stale:  # free again, and no record to take over
        assert stale is None


def test_an_error_in_the_block_lets_go_without_a_record(tmp_path):
    with pytest.raises(KeyError), claim(tmp_path):
        raise KeyError("boom")
    with claim(tmp_path) as stale:
        assert stale is None


def test_the_claim_of_a_process_that_died_is_taken_over(tmp_path):
    dead = {"host": "node7", "pid": 4242, "since": "2026-11-30 21:00:00"}
    (tmp_path / CLAIM).write_text(json.dumps(dead))  # written, then its holder was killed
    with claim(tmp_path) as stale:
        assert stale == dead


def _train(config, *extra):
    return subprocess.Popen([sys.executable, "-m", "kdkit", "train", str(config), "--quiet",
                             *extra], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_second_kdkit_train_into_a_running_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    long = {**MATTING, "train": {**MATTING["train"], "steps": 5000}}
    config.write_text(yaml.safe_dump({**long, "out_dir": str(out)}))
    first = _train(config)
    deadline = time.monotonic() + 120
    while not read_log(out, "train"):
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.02)
    second = _train(config, "--no-resume")  # would delete the first's checkpoint
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 2
    assert f"{out} is being trained by pid {first.pid} on host" in stderr
    assert first.poll() is None  # still training, undisturbed
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 128 + signal.SIGTERM, first.stderr.read()
    assert read_log(out, "interrupted")
