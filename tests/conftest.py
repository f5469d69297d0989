"""Shared fixtures: small random-weight Gemma-3 checkpoints shaped like every size, and the
real 270M converted by scripts/prepare_270m.py."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiled programs are reused across test runs (keys include every version involved);
# tests that need a cold cache point this elsewhere.
os.environ.setdefault(
    "OPTIMUM_GEMMA3_CACHE_DIR",
    os.path.join(os.path.expanduser("~"), ".cache", "optimum-gemma3", "test-compile-cache"),
)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny_models import save_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["tests.hub_server"]  # the `local_hub` fixture (loopback Hub server)


def pytest_configure(config):
    # Tiny models run fastest on one thread, and OpenMP threads spinning against another
    # process on 2 cores slow small ops down 20x. Real-model tests raise it locally.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Lazily saved random checkpoints, one folder per name `make_config` knows."""
    root = tmp_path_factory.mktemp("tiny")
    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in cache:
            cache[name] = save_random_checkpoint(name, root / name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def real_270m() -> Path:
    """The real Gemma-3 270M as an fp32 HF folder (converted once, then cached)."""
    from scripts.prepare_270m import ensure_checkpoint

    return ensure_checkpoint()
