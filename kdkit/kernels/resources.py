"""Compile the Triton similarity kernels for a GPU architecture without a GPU, and report
the registers, spills and shared memory of every launch variant kdkit uses.

    python -m kdkit.kernels.resources --arch 80 90 [--inputs fp32 bf16] [--check]
                                      [--output FILE.md]
    python -m kdkit.kernels.resources --arch 90 --inputs bf16 fp16 fp64 --sweep

Each kernel is compiled ahead of time (``triton.compile`` with an explicit target, then
Triton's own ``ptxas -v`` on its PTX) at the launch settings :func:`launch_settings` gives for the
largest channel counts (1024 teacher and student channels: every tile at its cap), for
float32 and float64 accumulation, for normalised, raw and both Grams, and for each dtype
of feature maps asked for (``--inputs``: float32, and bf16 or fp16 for mixed precision).
Register spills and shared memory over the architecture's per-block limit are what
``--check`` fails on:
a spilling kernel runs from local memory and misses the speed targets by a wide margin,
and one over the shared-memory limit does not launch. It needs Triton with its NVIDIA
backend (the Linux wheels); timing still needs a GPU (``kdkit bench kernels --device cuda``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from kdkit.kernels import describe_error
from kdkit.kernels.common import result_dtype
from kdkit.provenance import provenance_line

# per-block shared memory a kernel may use (opt-in maximum), by compute capability
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
CHANNELS = 1024  # the largest channel count the kernels promise: every tile at its cap
# dtypes of the feature maps, by Triton type name
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
INPUTS = tuple(DTYPES)
# what --sweep adds: 64-bit integer arguments (large tensors), and the integers Triton
# specialises to a constant when they equal 1
INTEGER_TYPES = ("i32", "i64")
ONES = ((), ("Ct",), ("Cs", "N"), ("C",))
# pointers to the feature maps and the gradient (the inputs' dtype), and to the backward's
# stored products (`result_dtype`); the rest hold the accumulation dtype
INPUT_POINTERS = {
    "_inverse_norms": {"x_ptr"},
    "_gram": {"t_ptr", "s_ptr"},
    "_gram_grad": {"t_ptr", "s_ptr"},
    "_normalise_grad": {"s_ptr", "out_ptr"},
}
STORED_POINTERS = {"_gram_grad": {"gn_ptr", "gr_ptr"}, "_normalise_grad": {"gn_ptr", "gr_ptr"}}
UNIT_STRIDES = ("t_sn", "s_sn", "stride_n")  # contiguous positions: Triton specialises 1


@dataclass(frozen=True)
class Usage:
    """One compiled variant: where it ran, its settings and what ptxas reports."""

    arch: int
    inputs: str
    kernel: str
    accumulate: str
    grams: str
    settings: str
    registers: int
    spill_bytes: int
    shared_bytes: int

    @property
    def problems(self) -> list[str]:
        found = []
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} bytes")
        limit = SHARED_MEMORY_LIMIT.get(self.arch)
        if limit is not None and self.shared_bytes > limit:
            found.append(f"{self.shared_bytes} bytes shared memory over the {limit} limit")
        return found


def _kernels():
    """The module of JIT kernels, imported compiled (not interpreted)."""
    os.environ["TRITON_INTERPRET"] = "0"
    from triton.runtime.jit import JITFunction

    from kdkit.kernels import triton_similarity

    if not isinstance(triton_similarity._gram, JITFunction):
        raise RuntimeError(
            "the kernels were imported under TRITON_INTERPRET=1; run this module in a fresh "
            "process without it (python -m kdkit.kernels.resources)")
    return triton_similarity


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``sm_<arch>`` (its wheel's, or TRITON_PTXAS_PATH)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _ptxas_usage(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) of the one kernel in ``ptx``."""
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        result = subprocess.run(
            [_ptxas(arch), "-v", f"--gpu-name={target}", str(source), "-o",
             str(Path(folder) / "kernel.cubin")],
            capture_output=True, text=True, check=True)
    report = result.stdout + result.stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


def _variants():
    """(kernel, float64 accumulation, NORMALISE, RAW) for every launch kdkit makes."""
    for acc64 in (True, False):
        yield "_inverse_norms", acc64, True, False
        for kernel in ("_gram", "_gram_grad", "_normalise_grad"):
            for normalise, raw in ((True, False), (False, True), (True, True)):
                yield kernel, acc64, normalise, raw


def compile_variant(arch: int, inputs: str, kernel: str, acc64: bool, normalise: bool,
                    raw: bool, integers: str = "i32", ones: tuple[str, ...] = ()) -> Usage:
    """Compile one launch variant for ``sm_<arch>`` and feature maps of dtype ``inputs``
    (a Triton type name: fp32, bf16, fp16, fp64), with ``integers`` for the integer
    arguments and those named in ``ones`` specialised to 1, and read its resource use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module = _kernels()
    function = getattr(module, kernel)
    acc_dtype = torch.float64 if acc64 else torch.float32
    launched_dtype = module.launch_dtype(DTYPES[inputs], acc_dtype)
    launched = NAMES[launched_dtype]
    settings = module.launch_settings(kernel, CHANNELS, CHANNELS, acc64, normalise and raw)
    options = {key: settings.pop(key)
               for key in ("num_warps", "num_stages", "enable_fp_fusion")}
    constants = {**settings, "ACC64": acc64}
    if "NORMALISE" in function.arg_names:
        constants.update(NORMALISE=normalise, RAW=raw)
    constants.update({name: 1 for name in UNIT_STRIDES + tuple(ones)
                      if name in function.arg_names})
    accumulation = "fp64" if acc64 else "fp32"
    signature = {}
    for name in function.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in INPUT_POINTERS[kernel]:
            signature[name] = f"*{launched}"
        elif name in STORED_POINTERS.get(kernel, ()):
            signature[name] = f"*{NAMES[result_dtype(launched_dtype)]}"
        elif name.endswith("_ptr"):
            signature[name] = f"*{accumulation}"
        else:
            signature[name] = "fp32" if name == "eps" else integers
    compiled = triton.compile(ASTSource(function, signature, constexprs=constants),
                              target=GPUTarget("cuda", arch, 32), options=options)
    registers, spills = _ptxas_usage(compiled.asm["ptx"], arch)
    grams = "both" if normalise and raw else "normalised" if normalise else "raw"
    tiles = " ".join(f"{k}={v}" for k, v in settings.items())
    shown = inputs if launched == inputs else f"{inputs} (as {launched})"
    return Usage(arch, shown, kernel, accumulation, "—" if kernel == "_inverse_norms" else grams,
                 f"{tiles} warps={options['num_warps']} stages={options['num_stages']}",
                 registers, spills, compiled.metadata.shared)


def _compile_task(task: tuple) -> Usage:
    return compile_variant(*task)


def resource_table(archs: list[int], inputs: list[str], jobs: int = 1,
                   progress=None) -> list[Usage]:
    """Every launch variant compiled for each architecture and input dtype, in ``jobs``
    processes."""
    tasks = [(arch, dtype, *variant)
             for arch in archs for dtype in inputs for variant in _variants()]
    _kernels()  # imported compiled before the workers fork
    rows = []
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        for row in pool.map(_compile_task, tasks):
            rows.append(row)
            if progress:
                progress(row)
    return rows


def _sweep_task(task: tuple) -> str | None:
    """None when the variant compiles, else a line saying what failed."""
    try:
        compile_variant(*task)
    except Exception as error:  # a compiler failure, reported rather than raised
        arch, inputs, kernel, acc64, normalise, raw, integers, ones = task
        return (f"sm_{arch} {inputs} {kernel} acc={'fp64' if acc64 else 'fp32'} "
                f"normalise={normalise} raw={raw} {integers} ones={ones}: "
                f"{describe_error(error)}")
    return None


def specialisation_sweep(archs: list[int], inputs: list[str], jobs: int = 1) -> list[str]:
    """Compile every variant also with 64-bit integer arguments and with the channel and
    position counts Triton specialises to 1: the failures, one line each."""
    tasks = [(arch, dtype, *variant, integers, ones)
             for arch in archs for dtype in inputs for variant in _variants()
             for integers in INTEGER_TYPES for ones in ONES]
    _kernels()
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        return [line for line in pool.map(_sweep_task, tasks) if line]


def markdown(rows: list[Usage], command: str) -> str:
    lines = [
        "# Triton kernel resources (compiled ahead of time, no GPU)",
        "",
        f"Generated by `{command}`; {provenance_line()} "
        f"{CHANNELS} teacher and student channels (every tile at its "
        "cap), unit position stride. Registers and spill stores from `ptxas -v`; shared "
        "memory from Triton's launch metadata, against the per-block limit of the "
        "architecture. These say whether a kernel spills or fits, not how fast it runs.",
        "",
        "| arch | inputs | kernel | accumulate | Grams | settings | registers | spill bytes | "
        "shared bytes | problems |",
        "|---|---|---|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| sm_{r.arch} | {r.inputs} | `{r.kernel}` | {r.accumulate} | {r.grams} | "
            f"{r.settings} | {r.registers} | {r.spill_bytes} | {r.shared_bytes:,} | "
            f"{'; '.join(r.problems) or 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kdkit.kernels.resources",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90],
                        help="compute capabilities, e.g. 80 (A100) 90 (H100/H200)")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=["fp32"],
                        help="dtypes of the feature maps (default: fp32)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per core)")
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a variant spills or exceeds shared memory")
    parser.add_argument("--sweep", action="store_true",
                        help="instead, compile every variant with 64-bit integers and with "
                             "counts of 1 too, and list what fails to compile")
    args = parser.parse_args(argv)
    if args.sweep:
        failures = specialisation_sweep(args.arch, args.inputs, args.jobs)
        count = len(list(_variants())) * len(INTEGER_TYPES) * len(ONES)
        count *= len(args.arch) * len(args.inputs)
        print("\n".join(failures) or "no failures")
        print(f"{count} variants compiled, {len(failures)} failed", file=sys.stderr)
        return 1 if args.check and failures else 0
    rows = resource_table(args.arch, args.inputs, args.jobs, progress=lambda r: print(
        f"sm_{r.arch} {r.inputs} {r.kernel} {r.accumulate} {r.grams}: {r.registers} registers, "
        f"{r.spill_bytes} B spilled, {r.shared_bytes} B shared", file=sys.stderr, flush=True))
    command = " ".join(["python -m kdkit.kernels.resources",
                        *(sys.argv[1:] if argv is None else argv)])
    table = markdown(rows, command)
    print(table)
    if args.output:
        args.output.write_text(table)
    bad = [r for r in rows if r.problems]
    for r in bad:
        print(f"sm_{r.arch} {r.inputs} {r.kernel} ({r.accumulate}, {r.grams}): "
              f"{'; '.join(r.problems)}",
              file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
