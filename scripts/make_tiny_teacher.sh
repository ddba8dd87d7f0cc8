#!/usr/bin/env bash
# Train a task's tiny-preset teacher on the CPU and ship it in the package (float16
# safetensors, with a JSON record of this command, the seed in the config and the test
# metrics). Usage: scripts/make_tiny_teacher.sh matting|segmentation
# About 40 minutes (matting) or a quarter of an hour (segmentation) on 2 cores. Run from
# the repository root after `make test`.
set -euo pipefail
task=${1:?usage: scripts/make_tiny_teacher.sh TASK}
config=tasks/$task/configs/tiny/teacher.yaml
run=runs/$task/tiny/teacher
command=".venv/bin/kdkit train $config --out $run --no-resume --quiet"
$command
.venv/bin/python -m kdkit.pretrained "$run" "tasks/$task/pretrained/tiny_teacher" --command "$command"
