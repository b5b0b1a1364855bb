#!/usr/bin/env bash
# Session 4, after benchmarks/turbopp_shapes_more.sh: continue out/turbopp-shapes with a 5× lower student learning
# rate (2e-5 instead of 1e-4) to UPDATES (default 2400), then evaluate like the committed student into
# out/turbopp-shapes-anneal/. The 1900-update weights are kept in out/turbopp-shapes-1900/.
#   bash benchmarks/turbopp_shapes_anneal.sh [UPDATES]
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p out/turbopp-shapes-1900 out/turbopp-shapes-anneal
[ -f out/turbopp-shapes-1900/step2.safetensors ] || \
  cp out/turbopp-shapes/{config.json,config.yaml,step1.safetensors,step2.safetensors} out/turbopp-shapes-1900/
$T distill --teacher models/teacher-shapes --cache out/demo/cache --config configs/demo.yaml \
   --set train.minutes=0 --set train.updates=${1:-2400} --set train.lr_student=2e-5 \
   --out out/turbopp-shapes --no-progress --resume
for s in 0 1 2; do
  $T eval --model out/turbopp-shapes --data shapes --num 1000 --seed $s --no-progress \
     --json out/turbopp-shapes-anneal/turbopp-shapes-seed$s.json
done
