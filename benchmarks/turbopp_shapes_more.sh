#!/usr/bin/env bash
# Session 4: continue the committed shapes student's run (out/turbopp-shapes, made by benchmarks/turbopp_shapes.sh)
# to UPDATES student updates (default 1900; the first sitting stopped at 972 by its 15-minute budget), same config,
# one thread; evaluate it like the committed one into out/turbopp-shapes-more/. It replaces models/turbopp-shapes
# only through benchmarks/turbopp_shapes.sh (stage 2 of 3).
#   bash benchmarks/turbopp_shapes_more.sh [UPDATES]
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
$T distill --teacher models/teacher-shapes --cache out/demo/cache --config configs/demo.yaml \
   --set train.minutes=0 --set train.updates=${1:-1900} --out out/turbopp-shapes --no-progress --resume
mkdir -p out/turbopp-shapes-more
for s in 0 1 2; do
  $T eval --model out/turbopp-shapes --data shapes --num 1000 --seed $s --no-progress \
     --json out/turbopp-shapes-more/turbopp-shapes-seed$s.json
done
