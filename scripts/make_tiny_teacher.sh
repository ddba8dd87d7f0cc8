#!/usr/bin/env bash
# Train the tiny preset's teacher on the CPU and ship it in the package (float16 safetensors,
# with a JSON record of this command, the seed in the config and the test metrics).
# Takes about half an hour on 2 cores. Run from the repository root after `make test`.
set -euo pipefail
config=tasks/matting/configs/tiny/teacher.yaml
run=runs/matting/tiny/teacher
command=".venv/bin/kdkit train $config --out $run --no-resume --quiet"
$command
.venv/bin/python -m tasks.matting.pretrained.export "$run" tiny_teacher --command "$command"
