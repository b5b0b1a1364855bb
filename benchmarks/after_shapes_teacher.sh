#!/usr/bin/env bash
# What runs once a new shapes teacher is trained (session 3: shapes v2): adopt it, tune its CFG by FD, the
# teacher-gap rows (3 seeds x 1000), the demo, README tables.
#   bash benchmarks/after_shapes_teacher.sh out/teacher-shapes-v2
set -euo pipefail
cd "$(dirname "$0")/.."
SRC=${1:?usage: after_shapes_teacher.sh TEACHER_RUN_FOLDER}
T=.venv/bin/twostep
for f in config.json model.safetensors loss_log.json train_config.json; do cp "$SRC/$f" models/teacher-shapes/$f; done
$T teacher tune-guidance --teacher models/teacher-shapes --data shapes --num 500 --grid 0 0.5 1 2 3 > logs/tune-shapes.log 2>&1
.venv/bin/python benchmarks/teacher_gap.py --data shapes photos > logs/gap-shapes.log 2>&1
rm -rf out/demo  # a demo of the previous teacher: its cache and run would be refused
$T demo --out out/demo > logs/demo.log 2>&1
.venv/bin/python benchmarks/update_readme.py
