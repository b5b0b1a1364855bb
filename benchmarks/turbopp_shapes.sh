#!/usr/bin/env bash
# The committed shapes student: the demo's config and teacher cache (configs/demo.yaml, out/demo/cache from
# `make demo`), trained in three stages on the 2-core CPU, then `twostep eval --num 1000` at seeds 0 1 2 (records
# in benchmarks/results/students/) and `twostep speed`:
#   1. 15 minutes at lr 1e-4 (session 3: 972 updates, 2 threads);           eval records: students_stages/*-972-*
#   2. benchmarks/turbopp_shapes_more.sh: to 1900 updates, same lr (1 thread); eval records: *-1900-*
#   3. benchmarks/turbopp_shapes_anneal.sh: to 2400 updates at lr 2e-5 (1 thread) -> models/turbopp-shapes
#      (FD ÷ teacher 8-step: 1.185 after stage 1, 1.173 after stage 2, 1.117 after stage 3; 3 seeds x 1000).
#   bash benchmarks/turbopp_shapes.sh
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
if [ ! -d out/turbopp-shapes/checkpoints ]; then
  $T distill --teacher models/teacher-shapes --cache out/demo/cache --config configs/demo.yaml \
     --set train.minutes=15 --out out/turbopp-shapes --no-progress
fi
bash benchmarks/turbopp_shapes_more.sh 1900
bash benchmarks/turbopp_shapes_anneal.sh 2400
bash benchmarks/commit_student.sh shapes
