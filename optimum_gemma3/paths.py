"""Where this package keeps what it builds on a machine."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/optimum-gemma3`, else `~/.cache/optimum-gemma3`: compiled programs
    (`compiler/cache.py`) and CPU kernels (`graphs/kernels`) live below it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum-gemma3"
