#!/usr/bin/env bash
# Create (or update) .venv with everything optimum-gemma3 needs, on a fresh machine.
# torch is pinned to the local CPU build first: an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e ".[tests]"
