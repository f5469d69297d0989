#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
# Two workers, one test file each at a time: compiling programs is mostly one core's work
# (Inductor's Python, then g++), so a cold run takes about half as long (-n 0: serial).
exec python -m pytest -q -n 2 --dist loadfile --durations=25 "$@"
