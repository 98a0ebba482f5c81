#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment in .venv with omnimamba and its test tools.
#
# torch: an existing torch visible to python3 is kept (users with a GPU keep their own build). Otherwise,
# on a machine without an NVIDIA GPU we install torch 2.14.1 + torchvision 0.29.1, which run on the CPU and
# which this project's CI machines hold on local disk, instead of letting pip pick a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.omnimamba-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi

"$PYTHON" - <<'PY' || { echo "omnimamba needs Python >= 3.10 (set PYTHON=/path/to/python3.x)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

# --system-site-packages lets a torch the user already installed be seen and kept.
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "setup: NVIDIA GPU found, installing torch from PyPI"
  "${PIP[@]}" torch torchvision
else
  echo "setup: no GPU found, installing a CPU-usable torch 2.14.1 + torchvision 0.29.1"
  "${PIP[@]}" "torch==2.14.1" "torchvision==0.29.1"
fi

"${PIP[@]}" -e ".[test,plot,serve]"
touch "$STAMP"
echo "setup: done ($VENV)"
