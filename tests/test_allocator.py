"""The runtime keeps freed memory for the next program call (`runtime.allocator`)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.test_artifacts import REPO

# A call's worth of 20 MB intermediates allocated, written and freed, as a per-layer
# program run does; the minor page faults of the calls after the first are printed.
CALLS = """
import resource, sys, torch
from optimum_gemma3.runtime.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def call():
    buffers = [torch.ones(5 * 2**20) for _ in range(4)]
    del buffers
call()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, **env) -> int:
    result = subprocess.run(
        [sys.executable, "-c", CALLS, mode],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), **env},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_intermediates_are_reused_without_page_faults():
    default, kept = page_faults("default"), page_faults("keep")
    pages_per_call = 4 * 5 * 2**20 * 4 // 4096  # four buffers of 5M floats
    # Five calls after the first: kept, they fault in less than half a call's pages in
    # all; glibc's defaults give some or all of every call's pages back (how many varies).
    assert kept < pages_per_call // 2
    assert kept < default


def test_thresholds_the_user_set_are_left_alone(monkeypatch):
    from optimum_gemma3.runtime import allocator

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    allocator.keep_freed_memory.cache_clear()
    try:
        assert not allocator.keep_freed_memory()
    finally:
        allocator.keep_freed_memory.cache_clear()
