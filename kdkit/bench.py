"""Micro-benchmarks of the similarity backends (``kdkit bench kernels``).

For each shape and backend: forward and forward+backward median time, peak extra memory,
the ratio to ``reference`` and to the floor. The floor is the larger of (bytes that must
move) / (measured copy bandwidth) and (flops) / (measured matmul throughput at the
accumulation precision), both ceilings measured on the device at the start of the run.
``reference`` cases whose maps cannot fit in memory are reported as OOM, not run.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kdkit import kernels
from kdkit.losses import (
    cross_image_affinity_loss,
    pairwise_affinity_loss,
    spatial_channel_similarity_loss,
    spatial_similarity_loss,
)
from kdkit.provenance import provenance_line

__all__ = ["Case", "Result", "paper_cases", "measure_ceilings", "median_ms", "run_benchmarks",
           "write_report"]

# the papers' conv2..conv5 after pooling: (stride, student channels, teacher channels)
PAPER_LAYERS = ((4, 64, 128), (8, 128, 256), (16, 256, 512), (32, 256, 512))
AUTHORS_POOL = 0.5  # Liu et al.'s pool_scale: the pair-wise map after max-pooling to 2×2

# Case.loss → the loss function (student, teacher, backend=, accumulate=)
LOSSES = {
    "spatial": spatial_similarity_loss,
    "spatial+channel": spatial_channel_similarity_loss,
    "pairwise": pairwise_affinity_loss,
    "pairwise pooled": functools.partial(pairwise_affinity_loss, pool=AUTHORS_POOL),
    "cross-image": cross_image_affinity_loss,
}


@dataclass(frozen=True)
class Case:
    """One benchmark: a loss over one or more layers ``(B, Cs, Ct, N)``."""

    name: str
    loss: str  # a key of LOSSES
    layers: tuple[tuple[int, int, int, int], ...]

    def map_layers(self) -> tuple[tuple[int, int, int, int], ...]:
        """The layers as the similarity map sees them: the cross-image map is one image of
        ``B·N`` positions; the authors' pooling leaves 2×2 positions (square maps of even
        side)."""
        if self.loss == "cross-image":
            return tuple((1, cs, ct, b * n) for b, cs, ct, n in self.layers)
        if self.loss == "pairwise pooled":
            return tuple((b, cs, ct, 4) for b, cs, ct, _ in self.layers)
        return self.layers

    def elements(self) -> int:
        return sum(b * (cs + ct) * n for b, cs, ct, n in self.layers)

    def student_elements(self) -> int:
        return sum(b * cs * n for b, cs, _, n in self.layers)

    def floor_flops(self, backward: bool) -> int:
        """The fewest flops (2 per multiply-add) any exact method needs: per layer, the
        cheaper of the symmetric Grams (``N·(Ct²/2 + Cs²/2 + Ct·Cs)`` forward,
        ``N·Cs·(Cs + Ct)`` backward) and the symmetric ``N×N`` maps (``N²·(Cs + Ct)/2``,
        ``N²·Cs``) for the spatial part; the channel part adds ``N·(Ct² + Cs²)/2`` and
        ``N·Cs²``."""
        total = 0
        for b, cs, ct, n in self.map_layers():
            grams = n * (ct * ct / 2 + cs * cs / 2 + ct * cs) + (n * cs * (cs + ct) if backward
                                                                 else 0)
            maps = n * n * (cs + ct) / 2 + (n * n * cs if backward else 0)
            macs = min(grams, maps)
            if self.loss == "spatial+channel":
                macs += n * (ct * ct + cs * cs) / 2 + (n * cs * cs if backward else 0)
            total += 2 * b * macs
        return int(total)

    def reference_bytes(self) -> int:
        """Memory the materialised maps need: ~6 float32 ``N×N`` maps per image with grad."""
        return sum(6 * 4 * b * n * n for b, _, _, n in self.map_layers())


@dataclass
class Result:
    device: str
    case: str
    loss: str
    shape: str
    backend: str
    accumulate: str
    forward_ms: float | None
    forward_backward_ms: float | None
    peak_extra_mb: float | None
    gradient_mb: float | None = None  # the student gradient every backend must write
    memory_percent_of_reference: float | None = None
    ratio_to_reference: float | None = None
    floor_ms: float | None = None
    ratio_to_floor: float | None = None
    note: str = ""


def paper_cases(batch: int) -> list[Case]:
    """The papers' setting at 320², and 640² and 1024² crops: spatial at conv2 (student
    channels, the N×N map's worst case), and spatial+channel over conv2..conv5 with the
    student adapted to teacher channels; at conv2 also the pair-wise affinity (the spatial
    map under another name), the pair-wise map after the authors' pooling, and the
    cross-image map."""
    cases = []
    for crop in (320, 640, 1024):
        conv2 = ((batch, 64, 128, (crop // 4) ** 2),)
        cases.append(Case(f"{crop}² conv2 spatial", "spatial", conv2))
        for loss in ("pairwise", "pairwise pooled", "cross-image"):
            cases.append(Case(f"{crop}² conv2 {loss}", loss, conv2))
        layers = tuple((batch, ct, ct, (crop // stride) ** 2) for stride, _, ct in PAPER_LAYERS)
        cases.append(Case(f"{crop}² conv2-5 spatial+channel", "spatial+channel", layers))
    return cases


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``repeats`` calls of ``fn`` after one warm-up call (CUDA
    events on a GPU, the wall clock on the CPU)."""
    fn()  # warm up: compilation, allocator, caches
    _synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(times)


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (GB/s, bytes read + written) and matmul throughput (GFLOP/s) in
    float32 (IEEE, no TF32) and float64, measured here."""
    size = (1 << 28) if device.type == "cuda" else (1 << 26)  # bytes per buffer
    source = torch.randn(size // 4, device=device)
    target = torch.empty_like(source)
    copy_ms = median_ms(lambda: target.copy_(source), device, 20)
    ceilings = {"copy_gb_s": 2 * size / copy_ms / 1e6}
    previous_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        edge = 4096 if device.type == "cuda" else 2048
        for dtype, key in ((torch.float32, "matmul_fp32_gflop_s"),
                           (torch.float64, "matmul_fp64_gflop_s")):
            a = torch.randn(edge, edge, device=device, dtype=dtype)
            b = torch.randn(edge, edge, device=device, dtype=dtype)
            ms = median_ms(lambda a=a, b=b: a @ b, device, 10)
            ceilings[key] = 2 * edge**3 / ms / 1e6
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous_tf32
    return ceilings


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 8 << 30


def _mmap_threshold(size: int) -> None:
    """glibc serves allocations above ``size`` by mmap and unmaps them on free; at 1 MiB
    the resident set tracks live tensors (for measuring), at 32 MiB (the ceiling of glibc's
    own adaptive threshold) freed memory is reused without page faults (for timing).
    A no-op where there is no glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)  # hand free heap memory back, so reuse shows in the RSS
    except (OSError, AttributeError):
        pass


class _PeakMemory:
    """Peak memory above the level at entry, in MB (CUDA allocator, or the process's
    resident set high-water mark on Linux)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb: float | None = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        raise OSError(key)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            _mmap_threshold(1 << 20)
            try:
                with open("/proc/self/clear_refs", "w") as handle:
                    handle.write("5")  # reset the high-water mark
                self.base = self._status("VmRSS:")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            if self.base is not None:
                self.peak_mb = max(0, self._status("VmHWM:") - self.base) / 2**20
            _mmap_threshold(32 << 20)


def _inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    pairs = []
    for b, cs, ct, n in case.layers:
        side = int(math.isqrt(n))
        s = torch.randn(b, cs, side, side, generator=g).to(device, dtype).requires_grad_()
        t = torch.randn(b, ct, side, side, generator=g).to(device, dtype)
        pairs.append((s, t))
    return pairs


def _loss_fn(case: Case, pairs, backend: str, accumulate: str):
    function = LOSSES[case.loss]

    def forward():
        return sum(function(s, t, backend=backend, accumulate=accumulate) for s, t in pairs)

    def forward_backward():
        loss = forward()
        loss.backward()
        for s, _ in pairs:
            s.grad = None

    return forward, forward_backward


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error)


def run_case(case, backend, accumulate, device, ceilings, repeats, dtype=torch.float32):
    """Time one case; an expected or actual out-of-memory becomes a result marked OOM, any
    other error a result marked ``failed: …`` (the run goes on to the next case)."""
    shape = " + ".join(f"{b}×{cs}/{ct}×{n}" for b, cs, ct, n in case.layers)
    result = Result(str(device), case.name, case.loss, shape, backend,
                    accumulate if kernels.BACKENDS[backend].accumulates else "n/a",
                    None, None, None)
    if backend == "reference" and case.reference_bytes() > 0.8 * _available_bytes(device):
        result.note = f"OOM (maps need ~{case.reference_bytes() / 2**30:.0f} GiB)"
        return result
    pairs = _inputs(case, device, dtype, seed=0)
    forward, forward_backward = _loss_fn(case, pairs, backend, accumulate)
    try:
        with torch.no_grad():
            result.forward_ms = median_ms(forward, device, repeats)
        with _PeakMemory(device) as memory:
            forward_backward()
        result.peak_extra_mb = memory.peak_mb
        result.forward_backward_ms = median_ms(forward_backward, device, repeats)
    except Exception as error:  # recorded in the table, so one failure costs one row
        if _is_oom(error) or isinstance(error, MemoryError):
            result.note = "OOM"
        else:
            result.note = f"failed: {kernels.describe_error(error, limit=160)}"
            result.forward_ms = result.forward_backward_ms = result.peak_extra_mb = None
    finally:
        del pairs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    element = torch.finfo(dtype).bits // 8
    result.gradient_mb = case.student_elements() * element / 2**20
    moved = (case.elements() + case.student_elements()) * element  # read s, t; write ds
    rate_key = "matmul_fp64_gflop_s" if accumulate == "fp64" else "matmul_fp32_gflop_s"
    result.floor_ms = max(moved / ceilings["copy_gb_s"] / 1e6,
                          case.floor_flops(backward=True) / ceilings[rate_key] / 1e6)
    if result.forward_backward_ms:
        result.ratio_to_floor = result.forward_backward_ms / result.floor_ms
    return result


def run_benchmarks(device: torch.device, batch: int, repeats: int, backends, accumulates,
                   cases=None, progress=print) -> tuple[list[Result], dict[str, float]]:
    """Every case × backend (× accumulation for the non-reference backends)."""
    ceilings = measure_ceilings(device)
    progress(f"ceilings on {device_name(device)}: " + ", ".join(
        f"{k}={v:,.0f}" for k, v in ceilings.items()))
    results = []
    for case in cases or paper_cases(batch):
        reference = None
        for backend in backends:
            for accumulate in (accumulates if kernels.BACKENDS[backend].accumulates
                               else ["fp32"]):
                result = run_case(case, backend, accumulate, device, ceilings, repeats)
                if backend == "reference":
                    reference = result
                elif reference and reference.forward_backward_ms and result.forward_backward_ms:
                    result.ratio_to_reference = (reference.forward_backward_ms
                                                 / result.forward_backward_ms)
                if (reference and backend != "reference" and reference.peak_extra_mb
                        and result.peak_extra_mb is not None):
                    result.memory_percent_of_reference = (
                        100 * result.peak_extra_mb / reference.peak_extra_mb)
                results.append(result)
                progress(_row(result))
    return results, ceilings


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def _fmt(value, digits=2) -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}"


def _row(r: Result) -> str:
    cells = [r.case, r.backend, r.accumulate, _fmt(r.forward_ms), _fmt(r.forward_backward_ms),
             _fmt(r.peak_extra_mb, 1), _fmt(r.gradient_mb, 1),
             _fmt(r.memory_percent_of_reference, 2), _fmt(r.ratio_to_reference, 1),
             _fmt(r.floor_ms, 3), _fmt(r.ratio_to_floor, 1), r.note]
    return "| " + " | ".join(cells) + " |"


def write_report(results: list[Result], ceilings: dict[str, float], device: torch.device,
                 out_dir: Path, command: str, batch: int) -> tuple[Path, Path]:
    """``kernels-<device>.md`` (a table) and ``kernels-<device>.csv`` (raw numbers)."""
    ran_with = provenance_line()  # before either file is rewritten: they may be tracked
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{device.type}"
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(results[0])))
        writer.writeheader()
        writer.writerows(asdict(result) for result in results)
    header = [
        f"# Similarity kernels on {device_name(device)}",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d')}); {ran_with} "
        f"Python {platform.python_version()}. Float32 inputs,",
        f"batch {batch}. Ceilings measured at the start of the run: copy "
        f"{ceilings['copy_gb_s']:,.1f} GB/s (read + write), matmul "
        f"{ceilings['matmul_fp32_gflop_s']:,.0f} GFLOP/s in float32 (IEEE) and "
        f"{ceilings['matmul_fp64_gflop_s']:,.0f} in float64.",
        "",
        "Times are medians (CUDA events on a GPU, wall clock on the CPU). Peak extra memory is",
        "above the inputs during one forward+backward (the CUDA allocator's peak, or on the",
        "CPU the resident-set high-water mark: coarse); it includes the student gradient",
        "(`gradient MB`), which every backend must write, and `% of reference` compares it",
        "with `reference`'s peak. `× reference` is reference",
        "forward+backward time over this backend's; the floor is max(bytes / copy bandwidth,",
        "fewest flops / matmul rate at the accumulation precision), with bytes = read the",
        "features once and write the gradient once, and the fewest flops those of the",
        "cheaper exact method per layer (symmetric C×C Grams, or symmetric N×N maps where N",
        "is below about C); `× floor` is time over floor.",
        "Raw numbers: the CSV beside this file.",
        "",
        "| case | backend | accumulate | forward ms | fwd+bwd ms | peak extra MB "
        "| gradient MB | % of reference | × reference | floor ms | × floor | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    md_path.write_text("\n".join(header + [_row(r) for r in results]) + "\n")
    return md_path, csv_path
