#!/usr/bin/env bash
# One device run: everything a lent GPU is needed for, inside one hard deadline, in order of
# value, each stage only while time is left and each killed at its own cap:
#   wheels         install carried wheels (.whl/*.whl) into a scratch site, --no-deps --no-index
#   environment    nvidia-smi's GPU, torch/Triton versions and kdkit's provenance line
#   bench-kernels  kdkit bench kernels --device cuda        → kernels-cuda.{md,csv}
#   kernel-tests   pytest tests/test_kernels.py, the Triton kernels compiled for real
#   precision      benchmarks/precision.py --device cuda   → precision-cuda.md
#   compare        kdkit compare PRESET --budget (the time left less a margin) → compare/report/
#   dcp            the DCP comparison under what is left, reusing the teacher just trained
# After every stage, everything made so far (logs, tables, report folders; never weights or
# checkpoints, nor any file over 4 MB) is packed into OUT/results.tar.gz and OUT/summary.txt
# says each stage's exit code and seconds, so a kill loses only the stage in flight. Work
# files stay in a scratch folder, so only those two files land in OUT. Without a CUDA device
# the CUDA stages are recorded as skipped (tests/test_device_run.py runs it so on the CPU).
#
# On a lent machine (the `run` tool; 15 minutes of device time per issue, 10 per command).
# Here, once, in the repository root (torch-pruning is the one dependency the image lacks;
# a 70 kB pure-Python wheel; .gitignore already ignores /.whl/, else add it to
# .git/info/exclude so that only `carry` sends it):
#   .venv/bin/python -m pip download --no-deps torch-pruning==1.6.1 -d .whl
# then one call of the run tool, nothing else (the 540 s default deadline fits one command,
# so no detached start is needed; timeout_s leaves a minute for the machine's own exit):
#   run  command: "KDKIT_COMMIT=<git rev-parse --short HEAD, typed here> bash scripts/device_run.sh"
#        carry: [".whl"]  timeout_s: 600
# (the copy sent over may have no .git; the commit is then known only from KDKIT_COMMIT)
# Back here, from the reply's files_at folder (results.tar.gz, summary.txt):
#   mkdir -p /tmp/device-run && tar -xzf FILES_AT/results.tar.gz -C /tmp/device-run
#   cp /tmp/device-run/kernels-cuda.md /tmp/device-run/kernels-cuda.csv \
#      /tmp/device-run/precision-cuda.md docs/benchmarks/
#   mkdir -p docs/results/gpu docs/results/dcp-gpu
#   cp /tmp/device-run/compare/report/* docs/results/gpu/
#   cp /tmp/device-run/dcp/report/* docs/results/dcp-gpu/     # when the dcp stage ran
#   git add docs/benchmarks/kernels-cuda.* docs/benchmarks/precision-cuda.md docs/results/gpu
#   git commit -m "device run on <GPU from environment.log>: ..." -- <those paths>
# The logs (logs/*.log, logs/gpu-util-*.csv) and summary.txt stay in the archive for reading.
#
# Usage: bash scripts/device_run.sh [--deadline S] [--out DIR] [--work DIR] [--preset YAML]
#          [--dcp-preset YAML] [--set K=V]... [--dcp-set K=V]... [--margin S] [--stages LIST]
#          [--wheels DIR]
#   --deadline S   whole-run limit in seconds (default $DEVICE_RUN_DEADLINE, else 540)
#   --out DIR      where results.tar.gz and summary.txt go (default $OUT, else device-run)
#   --work DIR     scratch folder for logs, tables and runs (default: a new one under /tmp)
#   --preset, --dcp-preset   the compare presets (default compare/device.yaml, dcp-device.yaml)
#   --set, --dcp-set         KEY=VALUE overrides passed to each kdkit compare
#   --margin S     seconds kept back from each compare's --budget for start-up and for the
#                  plan's misses (default: a quarter of the time left, at least 45; the
#                  budget itself keeps time for evaluation and the report)
#   --stages LIST  comma-separated stages to run (default: all, in the order above)
#   --wheels DIR   carried wheels (default .whl)
# Environment: PYTHON (default python3), KDKIT_COMMIT (the commit named in summary.txt and, in a
# copy without .git, in every table header: kdkit.provenance reads it).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
root=$PWD

# Seconds a stage needs at the least to be worth starting, and the share of the time left
# that caps it. A cap is a ceiling, not an allotment: what a stage leaves goes to the next.
# The kernel table writes nothing until it ends and is what a lease is most needed for, so
# it may take the most (Triton compiles every variant on first use); the compare stages take
# all that is left, their --budget that less the margin, so the report is written in time.
declare -A MIN_SECONDS=([wheels]=5 [environment]=5 [bench-kernels]=30 [kernel-tests]=30
                        [precision]=15 [compare]=30 [dcp]=90)
declare -A CAP_PERCENT=([wheels]=20 [environment]=20 [bench-kernels]=40 [kernel-tests]=25
                        [precision]=10 [compare]=100 [dcp]=100)
ALL_STAGES=wheels,environment,bench-kernels,kernel-tests,precision,compare,dcp
PACK_SECONDS=10  # kept back from every cap for the final packing

parse_args() {
  deadline=${DEVICE_RUN_DEADLINE:-540}
  out=${OUT:-device-run}
  work=""
  preset=tasks/matting/configs/compare/device.yaml
  dcp_preset=tasks/matting/configs/compare/dcp-device.yaml
  sets=()
  dcp_sets=()
  margin=""
  stages=$ALL_STAGES
  wheels=.whl
  while (( $# )); do
    [[ $1 == -h || $1 == --help || $# -ge 2 ]] \
      || { echo "device_run.sh: $1 needs a value" >&2; exit 2; }
    case $1 in
      --deadline) deadline=$2 ;;
      --out) out=$2 ;;
      --work) work=$2 ;;
      --preset) preset=$2 ;;
      --dcp-preset) dcp_preset=$2 ;;
      --set) sets+=("$2") ;;
      --dcp-set) dcp_sets+=("$2") ;;
      --margin) margin=$2 ;;
      --stages) stages=$2 ;;
      --wheels) wheels=$2 ;;
      -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
      *) echo "device_run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift 2
  done
  [[ $deadline =~ ^[0-9]+$ ]] || { echo "device_run.sh: --deadline takes seconds" >&2; exit 2; }
  [[ $margin =~ ^[0-9]*$ ]] || { echo "device_run.sh: --margin takes seconds" >&2; exit 2; }
  local stage
  for stage in ${stages//,/ }; do
    [[ ,$ALL_STAGES, == *,$stage,* ]] \
      || { echo "device_run.sh: unknown stage $stage (stages: $ALL_STAGES)" >&2; exit 2; }
  done
}

seconds_left() {  # until the deadline, less what the last packing needs
  echo $(( deadline - (SECONDS - started) - PACK_SECONDS ))
}

record() {  # one line in summary.txt, also printed
  echo "$1" | tee -a "$work/summary.txt"
}

pack() {  # everything made so far into OUT/results.tar.gz, replaced atomically
  # weights and checkpoints are large and not results; anything over 4 MB would crowd the
  # 16 MB a returned file may have, so it is listed in excluded.txt instead
  local large
  large=$(cd "$work" && find . -type f \( -name '*.pt' -o -name '*.pth' -o -name '*.ckpt' \
    -o -name '*.safetensors' -o -name '*.onnx' -o -name '*.npy' -o -size +4M \) | sort)
  printf '%s' "${large:+$large$'\n'}" > "$work/excluded.txt"
  cp "$work/summary.txt" "$out/summary.txt"
  tar -czf "$out/results.tar.gz.part" -C "$work" -X "$work/excluded.txt" . \
    && mv "$out/results.tar.gz.part" "$out/results.tar.gz"
}

run_stage() {  # run_stage NAME FUNCTION [ARGS...]: the function under its cap, logged
  local name=$1 left cap start rc
  shift
  [[ ,$stages, == *,$name,* ]] || return 0
  left=$(seconds_left)
  if (( left < MIN_SECONDS[$name] )); then
    record "$name: skipped, $left s left, needs ${MIN_SECONDS[$name]}"
    pack
    return 0
  fi
  cap=$(( left * CAP_PERCENT[$name] / 100 ))
  (( cap < MIN_SECONDS[$name] )) && cap=${MIN_SECONDS[$name]}
  start=$SECONDS
  # timeout signals its whole process group, so data-loader workers die with the stage
  timeout --kill-after=5 "$cap" bash -c "$(declare -f "$1" needs_cuda); \"\$@\"" _ "$@" \
    > "$work/logs/$name.log" 2>&1
  rc=$?
  if (( rc == 124 || rc == 137 )); then
    record "$name: killed at its cap of $cap s (exit $rc)"
  elif (( rc == 77 )); then
    record "$name: skipped, $(tail -n 1 "$work/logs/$name.log")"
  else
    record "$name: exit $rc in $(( SECONDS - start )) s (cap $cap s)"
  fi
  pack
}

needs_cuda() {  # exit 77 (recorded as skipped) where no CUDA device is visible
  [[ $HAVE_CUDA == yes ]] || { echo "no CUDA device"; exit 77; }
}

install_wheels() {
  compgen -G "$WHEELS/*.whl" > /dev/null || { echo "no wheels in $WHEELS"; exit 77; }
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "$WHEELS"/*.whl
}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not found or no GPU"
  echo "cpus: $(nproc), memory: $(free -g | awk '/^Mem:/ {print $2 " GiB"}')"  # loader cores
  "$PYTHON" - "$WHEELS" <<'EOF'
import importlib.metadata as metadata, pathlib, sys
import torch
from kdkit.provenance import library_version, provenance_line
device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
print(f"device: {device}; {provenance_line()}")
print(f"torch-pruning {library_version('torch-pruning')} (kdkit compare imports it)")
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):  # carried: are they importable?
    name = wheel.name.split("-")[0]
    print(f"carried {wheel.name}: installed {metadata.version(name)}")
EOF
}

bench_kernels() {
  needs_cuda
  # the default --out (docs/benchmarks of the copy sent over), so the table's header names
  # the plain command; then into the work folder, for the archive
  "$PYTHON" -m kdkit bench kernels --device cuda
  local rc=$?
  cp docs/benchmarks/kernels-cuda.md docs/benchmarks/kernels-cuda.csv "$WORK/" || rc=1
  return $rc
}

kernel_tests() {
  needs_cuda
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_kernels.py
}

precision_table() {
  needs_cuda
  "$PYTHON" benchmarks/precision.py --device cuda --out "$WORK"
}

compare() {  # compare NAME PRESET BUDGET [KEY=VALUE...]: one comparison under a time budget
  local name=$1 preset=$2 budget=$3 monitor="" overrides=()
  shift 3
  (( $# )) && overrides=(--set "$@")
  # GPU utilisation every 5 s: does the loader keep the GPU busy?
  if [[ $HAVE_CUDA == yes ]] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 \
      > "$WORK/logs/gpu-util-$name.csv" 2>&1 &
    monitor=$!
  fi
  local command=("$PYTHON" -m kdkit compare "$preset" --budget "$budget" --out "$WORK/$name"
                 --quiet ${overrides[@]+"${overrides[@]}"})
  echo "+ ${command[*]}"
  "${command[@]}"
  local rc=$?
  [[ -n $monitor ]] && kill "$monitor"
  return $rc
}

compare_stage() {  # compare_stage NAME PRESET [KEY=VALUE...]: budget from the time left
  local name=$1 left keep budget
  [[ ,$stages, == *,$name,* ]] || return 0
  left=$(seconds_left)
  # the plan is measured over a few warm-up steps; a comparison killed at its cap leaves no
  # report at all, so fewer steps are the cheaper error
  keep=${margin:-$(( left / 4 > 45 ? left / 4 : 45 ))}
  budget=$(( left - keep ))
  if (( budget < MIN_SECONDS[$name] )); then
    record "$name: skipped, $left s left, needs ${MIN_SECONDS[$name]} + $keep s margin"
    pack
    return 0
  fi
  record "$name: budget $budget s ($left s left, $keep s kept back as margin)"
  run_stage "$name" compare "$name" "$2" "$budget" "${@:3}"
}

main() {
  parse_args "$@"
  started=$SECONDS
  mkdir -p "$out" || exit 1
  out=$(cd "$out" && pwd)
  work=${work:-$(mktemp -d /tmp/kdkit-device-run.XXXXXX)}
  mkdir -p "$work/logs" && work=$(cd "$work" && pwd)
  : > "$work/summary.txt"
  # what the stage functions read (they run in child shells, under timeout)
  # the wheels go beside the work folder, not in it: installed packages are not results
  export PYTHON=${PYTHON:-python3} WORK=$work SITE=$work-site WHEELS=$wheels
  export PYTHONUNBUFFERED=1 PYTHONPATH="$root:$work-site${PYTHONPATH:+:$PYTHONPATH}"
  HAVE_CUDA=$("$PYTHON" -c 'import torch; print("yes" if torch.cuda.is_available() else "no")' \
    2>/dev/null || echo no)
  export HAVE_CUDA
  local commit=${KDKIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
  record "device run: deadline $deadline s, started $(date -u +%FT%TZ), kdkit $commit"

  run_stage wheels install_wheels
  run_stage environment environment
  run_stage bench-kernels bench_kernels
  run_stage kernel-tests kernel_tests
  run_stage precision precision_table
  compare_stage compare "$preset" ${sets[@]+"${sets[@]}"}
  # the DCP rows reuse the matting comparison's teacher when it was trained here
  local teacher=$work/compare/teacher/model.pt
  [[ -f $teacher ]] && dcp_sets+=("teacher.checkpoint=$teacher")
  compare_stage dcp "$dcp_preset" ${dcp_sets[@]+"${dcp_sets[@]}"}

  record "done in $(( SECONDS - started )) s: $out/results.tar.gz"
  pack
}

main "$@"
