#!/usr/bin/env bash
# The committed photos student (session 4): the demo's config (Turbo++ + paired regression, batch 16, lr 1e-4) on
# a 2048-sample photos teacher cache (the sweep's cache command, seed 0), MINUTES of distillation (default 30, one
# thread so a sweep can share the 2 cores), then `twostep eval --num 1000` at seeds 0 1 2
# (records in benchmarks/results/students/).
#   bash benchmarks/turbopp_photos.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
MIN=${1:-30}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
CACHE=benchmarks/work/cache-photos-2048   # shared with benchmarks/run.py (same command, same seed)
if ! grep -q '"complete": true' $CACHE/manifest.json 2>/dev/null; then
  $T teacher cache --teacher models/teacher-photos --data photos --num 2048 --seed 0 --out $CACHE --no-progress
fi
RESUME=""; [ -d out/turbopp-photos/checkpoints ] && RESUME=--resume
$T distill --teacher models/teacher-photos --cache $CACHE --config configs/demo.yaml \
   --set train.minutes=$MIN --out out/turbopp-photos --no-progress $RESUME
bash benchmarks/commit_student.sh photos
