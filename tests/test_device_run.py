"""scripts/device_run.sh on the CPU: the CUDA stages are recorded as skipped, the comparison
runs under --budget on the tiny preset, and results.tar.gz holds everything made so far after
every stage (a stage killed at its cap, or the whole run killed, loses only that stage)."""

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "device_run.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, so the wheels stage installs something offline."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "devrun_probe-0.0.1-py3-none-any.whl"
    info = "devrun_probe-0.0.1.dist-info"
    files = {
        "devrun_probe/__init__.py": "",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: devrun-probe\nVersion: 0.0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                         "Tag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
    return path


def fake_nvidia_smi(folder: Path, pid_file: Path) -> Path:
    """An ``nvidia-smi`` that records its pid and hangs, to stall the environment stage."""
    folder.mkdir(parents=True, exist_ok=True)
    tool = folder / "nvidia-smi"
    tool.write_text(f"#!/usr/bin/env bash\necho $$ > {pid_file}\nexec sleep 120\n")
    tool.chmod(0o755)
    return folder


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, left unreaped where no init reaps, does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def environment(path_first: Path | None = None) -> dict[str, str]:
    # one thread: on a CPU shared with other work, two spinning OpenMP threads made steps 10×
    # slower than the budget's warm-up measured (seen here: 40 ms, then 400-960 ms)
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    env.pop("DEVICE_RUN_DEADLINE", None)
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return env


def script(tmp_path: Path, *args: str) -> list[str]:
    return ["bash", str(SCRIPT), "--out", str(tmp_path / "out"), "--work",
            str(tmp_path / "work"), "--wheels", str(tmp_path / "wheels"), *args]


def archive(tmp_path: Path) -> dict[str, bytes]:
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        return {member.name.removeprefix("./"): tar.extractfile(member).read()
                for member in tar.getmembers() if member.isfile()}


def summary(files: dict[str, bytes]) -> dict[str, list[str]]:
    """Each stage's summary.txt lines, by stage name."""
    lines: dict[str, list[str]] = {}
    for line in files["summary.txt"].decode().splitlines():
        stage, _, rest = line.partition(": ")
        lines.setdefault(stage, []).append(rest)
    return lines


@pytest.mark.slow
def test_cpu_end_to_end_on_the_tiny_preset(tmp_path):
    probe_wheel(tmp_path / "wheels")
    started = time.monotonic()
    done = subprocess.run(
        # a small budget (about 55 s, the tiny preset's floor is about 45) under a far larger
        # cap, so a CPU shared with other work overrunning the plan is not a failure here
        script(tmp_path, "--deadline", "125", "--margin", "55",
               "--preset", "tasks/matting/configs/compare/tiny.yaml",
               "--set", "only=[student,spatial]", "--set", "base.data.test_length=4",
               "--set", "report.examples=2"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 125 + 15  # the deadline holds (plus the final pack)
    # only the archive and the summary land in OUT; the rest stays in the scratch folder
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.tar.gz",
                                                                    "summary.txt"]
    files = archive(tmp_path)
    assert files["summary.txt"] == (tmp_path / "out" / "summary.txt").read_bytes()
    stages = summary(files)
    assert stages["wheels"][0].startswith("exit 0")
    assert stages["environment"][0].startswith("exit 0")
    assert b"carried devrun_probe-0.0.1-py3-none-any.whl: installed 0.0.1" in (
        files["logs/environment.log"])  # later stages import what the wheels stage installed
    assert b"device: no CUDA device; kdkit " in files["logs/environment.log"]
    assert b"torch-pruning " in files["logs/environment.log"]  # compare cannot run without
    for cuda_stage in ("bench-kernels", "kernel-tests", "precision"):
        assert stages[cuda_stage] == ["skipped, no CUDA device"]
    budget_line, result = stages["compare"]
    assert budget_line.startswith("budget ") and result.startswith("exit 0"), stages["compare"]
    assert 45 < int(budget_line.split()[1]) < 70
    assert stages["dcp"][0].startswith("skipped, ")  # too little time left for it
    assert "done in" in files["summary.txt"].decode().splitlines()[-1]
    report = files["compare/report/results.md"].decode()
    assert "| student |" in report and "| spatial |" in report
    assert "compare/report/results.csv" in files and "logs/compare.log" in files
    assert not [name for name in files if name.endswith((".pt", ".safetensors"))]
    assert not [name for name in files if "devrun_probe" in name]  # installed, not a result
    assert (tmp_path / "work" / "compare" / "student" / "seed0" / "model.pt").exists()
    assert "./compare/student/seed0/model.pt" in files["excluded.txt"].decode()


def test_a_stage_over_its_cap_is_killed_with_its_processes_and_recorded(tmp_path):
    pid_file = tmp_path / "nvidia-smi.pid"
    tools = fake_nvidia_smi(tmp_path / "bin", pid_file)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "big.log").write_bytes(b"x" * (5 << 20))  # over 4 MB: left out
    started = time.monotonic()
    # 40 s deadline: 10 kept for packing, the environment stage capped at a fifth of the rest
    done = subprocess.run(script(tmp_path, "--deadline", "40", "--stages",
                                 "environment,precision"),
                          cwd=tmp_path, env={**environment(tools), "KDKIT_COMMIT": "abc1234"},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - started < 20
    files = archive(tmp_path)
    stages = summary(files)
    assert stages["environment"][0].startswith("killed at its cap of "), stages
    assert "big.log" not in files and files["excluded.txt"] == b"./big.log\n"
    assert "logs/environment.log" in files
    assert stages["precision"] == ["skipped, no CUDA device"]
    assert "wheels" not in stages and "compare" not in stages  # not asked for
    assert stages["device run"][0].endswith(", kdkit abc1234")  # the commit sent over
    assert not alive(int(pid_file.read_text()))  # timeout killed the stage's process group


def test_a_killed_run_keeps_the_archive_of_the_stages_before(tmp_path):
    probe_wheel(tmp_path / "wheels")
    pid_file = tmp_path / "nvidia-smi.pid"
    tools = fake_nvidia_smi(tmp_path / "bin", pid_file)
    run = subprocess.Popen(script(tmp_path, "--deadline", "600"), cwd=tmp_path,
                           env=environment(tools), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        for _ in range(300):  # the environment stage has started once nvidia-smi runs
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            pytest.fail("the environment stage never started")
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # the whole run, as a lease's end would
        # the stage runs under timeout, in a process group of its own
        if pid_file.exists() and pid_file.read_text().strip():
            try:
                os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.wait()
    files = archive(tmp_path)
    stages = summary(files)
    assert stages["wheels"][0].startswith("exit 0") and "environment" not in stages
    assert "logs/wheels.log" in files
    assert (tmp_path / "out" / "summary.txt").read_bytes() == files["summary.txt"]


def test_the_dcp_stage_reuses_the_teacher_trained_by_the_comparison(tmp_path):
    teacher = tmp_path / "work" / "compare" / "teacher" / "model.pt"
    teacher.parent.mkdir(parents=True)
    teacher.write_bytes(b"weights")
    # a config error (an unknown method) ends the comparison at once: only the call matters
    done = subprocess.run(
        script(tmp_path, "--deadline", "110", "--margin", "1", "--stages", "dcp",
               "--dcp-preset", "tasks/matting/configs/compare/tiny.yaml",
               "--dcp-set", "only=[no-such-method]"),
        cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    files = archive(tmp_path)
    budget_line, result = summary(files)["dcp"]
    assert budget_line.startswith("budget ") and result.startswith("exit 2")
    log = files["logs/dcp.log"].decode()
    assert f"--set only=[no-such-method] teacher.checkpoint={teacher}" in log, log
    assert "only names unknown methods" in log
    assert "./compare/teacher/model.pt" in files["excluded.txt"].decode()


def test_bad_arguments_exit_2(tmp_path):
    for args in (["--deadline", "soon"], ["--bogus", "1"], ["--deadline"],
                 ["--stages", "environment,everything"], ["--margin", "-5"]):
        done = subprocess.run(script(tmp_path, *args), cwd=tmp_path, env=environment(),
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 2, (args, done.stderr)
        assert "device_run.sh" in done.stderr
    assert not (tmp_path / "out" / "results.tar.gz").exists()


def test_help_is_the_header():
    done = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0
    assert "carry: [\".whl\"]" in done.stdout and "--deadline S" in done.stdout
