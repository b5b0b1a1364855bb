#!/usr/bin/env bash
# The committed shapes student (session 3): the demo's config and teacher cache, 15 minutes of distillation on
# the 2 cores, then `twostep eval --num 1000` at seeds 0 1 2 (records in benchmarks/results/students/).
#   bash benchmarks/turbopp_shapes.sh          (after `make demo`, which builds out/demo/cache)
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
$T distill --teacher models/teacher-shapes --cache out/demo/cache --config configs/demo.yaml \
   --set train.minutes=15 --out out/turbopp-shapes --no-progress
mkdir -p models/turbopp-shapes benchmarks/results/students
cp out/turbopp-shapes/{config.json,config.yaml,step1.safetensors,step2.safetensors,loss_curves.png} models/turbopp-shapes/
for s in 0 1 2; do
  $T eval --model models/turbopp-shapes --data shapes --num 1000 --seed $s --no-progress \
     --json benchmarks/results/students/turbopp-shapes-seed$s.json
done
$T speed --teacher models/teacher-shapes --student models/turbopp-shapes --batch 32 --json benchmarks/results/students/turbopp-shapes-speed.json
