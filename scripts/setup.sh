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
touch "$VENV/.installed"
echo "setup: done (torch $TV)"
