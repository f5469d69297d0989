#!/usr/bin/env bash
# Set everything up, then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1
if [ "$#" -gt 0 ]; then
  exec python -m pytest -q --durations=15 "$@"
fi
# The tensor-parallel tests run in a process of their own: after the rest of the suite in
# one process, their gloo ranks have twice waited forever on a call (parent in poll, ranks
# in a futex) though the file passes alone every time; until that is found, isolate them.
python -m pytest -q --durations=15 --ignore=tests/test_tensor_parallel.py
exec python -m pytest -q --durations=5 tests/test_tensor_parallel.py
