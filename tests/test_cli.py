import subprocess
import sys

from kdkit.cli import main


def test_demo_runs_end_to_end_at_toy_scale(capsys):
    assert main(["demo", "--steps", "2", "--size", "32", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    for line in ("teacher", "student alone", "student + KD", "held-out accuracy"):
        assert line in out


def test_module_entry_point_prints_help():
    result = subprocess.run(
        [sys.executable, "-m", "kdkit", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout
