#!/usr/bin/env bash
# The package as a user installs it, away from its repository: `python -m build` (the sdist, then the wheel built
# from that sdist), the wheel installed NOT editable into a fresh venv, and from an empty directory:
# `twostep --version`, `--help`, a preset found by name, and a tiny end-to-end job (teacher cache -> distill
# 2 updates -> sample -> export) with the committed shapes teacher. TWOSTEP_MODELS points at the repository's
# models/ (the only thing read from the checkout); the config presets come from the wheel.
#
#   bash scripts/wheel_check.sh [PYTHON]    # PYTHON: has `build` (default .venv/bin/python, from `make install`)
#
# torch comes from `pip install torch==2.13.0` as in scripts/setup.sh (a local wheel where there is one), the
# rest pinned by constraints.txt. Prints the seconds of each phase.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$REPO/.venv/bin/python}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/twostep-wheel.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
lap() { echo "wheel_check: $1 ($((SECONDS - t)) s)"; t=$SECONDS; }
t=$SECONDS

"$PY" -m build --outdir "$WORK/dist" "$REPO" >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
WHEEL=$(ls "$WORK"/dist/twostep-*.whl)
lap "built $(basename "$WHEEL") from the sdist"

BASE=$("$PY" -c "import sys; print(sys._base_executable)")  # the interpreter behind the venv, not the venv
"$BASE" -m venv "$WORK/venv"
V=$WORK/venv/bin
"$V/pip" install --disable-pip-version-check -q --no-compile torch==2.13.0
TV=$("$V/python" -c "import torch; print(torch.__version__)")
sed "s/^torch==.*/torch==${TV}/" "$REPO/constraints.txt" > "$WORK/constraints.txt"
"$V/pip" install --disable-pip-version-check -q --no-compile -c "$WORK/constraints.txt" "$WHEEL" 2>&1 \
    | { grep -v "^WARNING: Location .* is ignored" || true; }
lap "installed into a fresh venv (torch $TV)"

mkdir "$WORK/empty" && cd "$WORK/empty"
export TWOSTEP_MODELS=$REPO/models
unset TWOSTEP_CONFIGS PYTHONPATH
TEACHER=$TWOSTEP_MODELS/teacher-shapes
where=$("$V/python" -c "import twostep; print(twostep.__file__)")
case $where in "$WORK"/venv/*) ;; *) echo "wheel_check: twostep imported from $where, not the venv"; exit 1;; esac
want=$("$V/python" -c "import importlib.metadata as m; print('twostep', m.version('twostep'))")
got=$("$V/twostep" --version)
[ "$got" = "$want" ] || { echo "wheel_check: --version says '$got', the metadata '$want'"; exit 1; }
"$V/twostep" --help >/dev/null
"$V/twostep" distill --dry-run --teacher "$TEACHER" --config zimage-turbo-lora-1gpu > dry_run.txt
grep -q "decoupling: lora" dry_run.txt
lap "$got: --version, --help, the preset zimage-turbo-lora-1gpu by name"

"$V/twostep" --threads 2 teacher cache --teacher "$TEACHER" --data shapes --num 4 --shard-size 4 --out cache \
    --no-progress
lap "teacher cache"
"$V/twostep" --threads 2 distill --teacher "$TEACHER" --cache cache --config turbopp --out run --no-progress \
    --set train.updates=2 --set train.batch_size=2 --set train.d_warmup=0 --set train.grid_every=0 \
    --set train.log_every=1
lap "distill"
"$V/twostep" --threads 2 sample --model run --prompt "a red circle" --prompt "two blue squares" --num 2 \
    --out grid.png
lap "sample"
"$V/twostep" --threads 2 export --model run --out pipeline
test -s grid.png && test -s pipeline/model_index.json && test -s run/status.json
lap "export"
echo "wheel_check: OK in $((SECONDS - start)) s"
