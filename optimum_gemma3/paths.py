"""Where this package keeps what it builds on a machine, and how it writes a file."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/optimum-gemma3`, else `~/.cache/optimum-gemma3`: compiled programs
    (`compiler/cache.py`) and CPU kernels (`graphs/kernels`) live below it."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "optimum-gemma3"


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without error, rename it
    onto `path` in one step, else remove it.

    Why: a reader (another process, or this one after a crash) sees the old file or the
    whole new one, never a truncated one; the rename is atomic because both names are in
    one folder, on one filesystem. The block creates the file, so it gets the permissions
    any new file gets (a `mkstemp` file is private, and a saved model's manifest or card
    would stay unreadable to other users); the random name keeps writers apart.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{path.name}-{os.getpid()}-{secrets.token_hex(8)}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
