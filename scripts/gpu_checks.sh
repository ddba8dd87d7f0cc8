#!/usr/bin/env bash
# Every check that needs a GPU, in one run: the similarity-kernel benchmark
# (kernels-cuda.{md,csv}, for docs/benchmarks/), the kernel tests compiled for real, the
# precision table and the whole test suite on the GPU. Logs, tables and summary.txt go to
# OUT.
#
#   bash scripts/gpu_checks.sh [OUT]          # OUT defaults to $OUT, else gpu-checks/
#
# From a source tree with torch and Triton installed (a lent H100/H200 has both but no
# package index): put the torch-pruning wheel in .whl/ first, e.g. here
#   echo /.whl/ >> .git/info/exclude; pip download --no-deps torch-pruning==1.6.1 -d .whl
# and carry .whl; it is installed with --no-deps, and the tree is used through PYTHONPATH.
# A step that fails is recorded and the next one runs. Long: start it detached
# (setsid nohup bash scripts/gpu_checks.sh "$OUT" > "$OUT/run.log" 2>&1 &) and poll
# summary.txt.
set -uo pipefail
out=${1:-${OUT:-gpu-checks}}
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}

step() {  # step NAME COMMAND...: run COMMAND, log to OUT/NAME.log, record exit and time
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc in $(( $(date +%s) - start )) s" | tee -a "$out/summary.txt"
}

if compgen -G ".whl/*.whl" > /dev/null; then
  step install-wheels "$python" -m pip install --no-deps --no-index .whl/*.whl
fi
step environment bash -c "nvidia-smi; $python -c 'import torch, triton;
print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'"
step kernel-resources "$python" -m kdkit.kernels.resources --arch 80 90 \
  --inputs fp32 bf16 fp16 --check --output "$out/kernel-resources.md"
# the table first: it is what a session's device time is most needed for
step bench-kernels "$python" -m kdkit bench kernels --device cuda --out "$out"
step kernel-tests "$python" -m pytest -q -p no:cacheprovider tests/test_kernels.py
step precision "$python" benchmarks/precision.py --device cuda --out "$out"
step test-suite "$python" -m pytest -q -p no:cacheprovider
echo "done: $out/summary.txt"
