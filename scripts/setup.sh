#!/usr/bin/env bash
# Create/refresh the virtual environment: torch first (kept if a suitable one is already importable), then
# everything else under a constraints file that pins torch to the installed build (so nothing can swap it for
# a multi-GB CUDA wheel). Never installs torchvision.
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  if $PY -c "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); sys.exit(0 if v >= (2, 4) else 1)" 2>/dev/null; then
    echo "setup: keeping the torch already installed for $PY"
    $PY -m venv --system-site-packages "$VENV"
  else
    $PY -m venv "$VENV"
  fi
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "$VENV/bin/pip" install --disable-pip-version-check -q torch==2.13.0
fi
TV=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
sed "s/^torch==.*/torch==${TV}/" constraints.txt > "$VENV/constraints.txt"
"$VENV/bin/pip" install --disable-pip-version-check -q -c "$VENV/constraints.txt" -e ".[test]"
# torch-fidelity (the field's FID code, for tests/test_fid_reference.py only): without its dependencies (it
# requires torchvision) and outside site-packages (torchmetrics imports it, hence torchvision, when importable)
TF=$(grep '^torch-fidelity==' constraints.txt | cut -d= -f3)
if [ ! -d "$VENV/reference/torch-fidelity/torch_fidelity-$TF.dist-info" ]; then
  "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps --upgrade \
    --target "$VENV/reference/torch-fidelity" "torch-fidelity==$TF"
fi
touch "$VENV/.installed"
echo "setup: done (torch $TV)"
