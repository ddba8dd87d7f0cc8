import csv
import importlib.util
from pathlib import Path

import pytest
import torch

from kdkit import bench
from kdkit.cli import build_parser, main
from kdkit.kernels import resources
from kdkit.provenance import provenance_line

ROOT = Path(__file__).resolve().parents[1]


def test_case_accounting_by_hand():
    case = bench.Case("x", "spatial", ((2, 3, 5, 7),))
    assert case.elements() == 2 * 8 * 7
    assert case.student_elements() == 2 * 3 * 7
    # N = 7 < C = 8: the symmetric maps are cheaper than the Grams
    assert case.floor_flops(backward=False) == 2 * 2 * (7 * 7 * 8 / 2)
    assert case.floor_flops(backward=True) == 2 * 2 * (7 * 7 * 8 / 2 + 7 * 7 * 3)
    wide = bench.Case("z", "spatial", ((1, 4, 6, 100),))
    assert wide.floor_flops(backward=True) == 2 * 100 * (18 + 8 + 24 + 4 * 10)
    fused = bench.Case("y", "spatial+channel", ((1, 4, 4, 10),))
    assert fused.floor_flops(backward=False) == 2 * 10 * ((8 + 8 + 16) + (16 + 16) / 2)
    assert case.reference_bytes() == 6 * 4 * 2 * 7 * 7


def test_paper_cases_follow_the_papers_layers():
    cases = {c.name: c for c in bench.paper_cases(16)}
    assert cases["320² conv2 spatial"].layers == ((16, 64, 128, 6400),)
    assert [layer[3] for layer in cases["320² conv2-5 spatial+channel"].layers] == [
        6400, 1600, 400, 100]
    assert [layer[2] for layer in cases["1024² conv2-5 spatial+channel"].layers] == [
        128, 256, 512, 512]


def test_reference_that_cannot_fit_is_reported_not_run():
    huge = bench.Case("huge", "spatial", ((16, 64, 128, 1 << 20),))
    ceilings = {"copy_gb_s": 10.0, "matmul_fp32_gflop_s": 100.0, "matmul_fp64_gflop_s": 50.0}
    result = bench.run_case(huge, "reference", "fp32", torch.device("cpu"), ceilings, 1)
    assert result.note.startswith("OOM") and result.forward_ms is None


def test_a_failing_backend_is_a_row_not_a_crash(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore detail")

    monkeypatch.setitem(bench.LOSSES, "spatial", broken)
    case = bench.Case("small", "spatial", ((1, 4, 8, 64),))
    ceilings = {"copy_gb_s": 10.0, "matmul_fp32_gflop_s": 100.0, "matmul_fp64_gflop_s": 50.0}
    result = bench.run_case(case, "factored", "fp64", torch.device("cpu"), ceilings, 1)
    assert result.note == "failed: RuntimeError: PassManager::run failed"
    assert result.forward_ms is None and result.forward_backward_ms is None


def test_bench_command_writes_table_and_csv(tmp_path, capsys):
    argv = ["bench", "kernels", "--batch", "1", "--crops", "320", "--repeats", "1",
            "--backends", "reference", "factored", "--accumulate", "fp64", "--out",
            str(tmp_path)]
    assert main(argv) == 0
    table = (tmp_path / "kernels-cpu.md").read_text()
    assert "| 320² conv2 spatial | factored | fp64 |" in table
    assert "copy" in table and provenance_line() in table
    with open(tmp_path / "kernels-cpu.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["case"], r["backend"]) for r in rows] == [
        ("320² conv2 spatial", "reference"), ("320² conv2 spatial", "factored"),
        ("320² conv2 pairwise", "reference"), ("320² conv2 pairwise", "factored"),
        ("320² conv2 pairwise pooled", "reference"), ("320² conv2 pairwise pooled", "factored"),
        ("320² conv2 cross-image", "reference"), ("320² conv2 cross-image", "factored"),
        ("320² conv2-5 spatial+channel", "reference"),
        ("320² conv2-5 spatial+channel", "factored"),
    ]
    factored = rows[1]
    assert float(factored["ratio_to_reference"]) > 1 and float(factored["floor_ms"]) > 0
    assert float(factored["gradient_mb"]) == pytest.approx(64 * 6400 * 4 / 2**20)
    assert 0 <= float(factored["memory_percent_of_reference"]) < 100
    assert "wrote" in capsys.readouterr().out


def test_bench_times_the_default_precision_unless_told_otherwise():
    accumulate = build_parser().parse_args(["bench", "kernels"]).accumulate
    assert accumulate == ["auto", "fp32", "fp64"]  # auto: what training uses by default


def _precision_script():
    spec = importlib.util.spec_from_file_location("precision", ROOT / "benchmarks/precision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_table_names_the_commit_and_the_library_versions():
    line = provenance_line()
    assert line.startswith("kdkit ") and all(f"{name} " in line
                                             for name in ("torch", "Triton", "timm"))
    precision = _precision_script().report_lines(torch.device("cpu"), [(1, 2, 3, 3)], [])
    assert line in "\n".join(precision)
    assert line in resources.markdown([], "python -m kdkit.kernels.resources")
