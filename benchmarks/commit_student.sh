#!/usr/bin/env bash
# Copy a finished student run out/turbopp-DATA into models/turbopp-DATA, then record what the README's results
# table reads: `twostep eval --num 1000` at seeds 0 1 2 and `twostep speed` at batch 32
# (benchmarks/results/students/; tabulated by benchmarks/students_table.py).
#   bash benchmarks/commit_student.sh shapes|photos
set -euo pipefail
cd "$(dirname "$0")/.."
T=.venv/bin/twostep
D=$1
mkdir -p models/turbopp-$D benchmarks/results/students
cp out/turbopp-$D/{config.json,config.yaml,step1.safetensors,step2.safetensors,loss_curves.png} models/turbopp-$D/
for s in 0 1 2; do
  $T eval --model models/turbopp-$D --data $D --num 1000 --seed $s --no-progress \
     --json benchmarks/results/students/turbopp-$D-seed$s.json
done
$T speed --teacher models/teacher-$D --student models/turbopp-$D --batch 32 \
   --json benchmarks/results/students/turbopp-$D-speed.json
