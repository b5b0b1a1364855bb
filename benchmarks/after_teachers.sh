#!/usr/bin/env bash
# What runs once the teachers are trained: CFG tuning by FD, the teacher-gap table, README tables.
#   bash benchmarks/after_teachers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
T=.venv/bin/twostep
for d in shapes photos; do
  $T --threads 1 teacher tune-guidance --teacher models/teacher-$d --data $d --num 500 --grid 0 0.5 1 2 3 \
     > logs/tune-$d.log 2>&1 &
done
wait
for d in shapes photos; do
  .venv/bin/python benchmarks/teacher_gap.py --data $d --threads 1 > logs/gap-$d.log 2>&1 &
done
wait
.venv/bin/python benchmarks/teacher_gap.py --threads 1      # all records cached: writes teacher_gap.md
.venv/bin/python benchmarks/update_readme.py
