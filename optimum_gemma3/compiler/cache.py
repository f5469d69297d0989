"""A local content-addressed cache of compiled programs.

Programs take weights as inputs, so a program depends only on the architecture, the
export shapes, the ops profile, the compiler stack and the source of the graphs and
kernels: exporting the same shape again (a fine-tune, a re-export) reuses it instead of
recompiling for minutes, and any change to that source (`graph_sources`) compiles anew.

- Location: `$OPTIMUM_GEMMA3_CACHE_DIR`, else `~/.cache/optimum-gemma3/compiled`
  (`$XDG_CACHE_HOME` respected).
- Disable with `OPTIMUM_GEMMA3_DISABLE_COMPILE_CACHE=1`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from .. import compiler, graphs
from ..paths import cache_root, replaced_atomically

logger = logging.getLogger(__name__)

# Config keys that do not change the compiled graph (provenance and generation defaults).
NON_GRAPH_CONFIG_KEYS = {
    "_name_or_path",
    "architectures",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "id2label",
    "label2id",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
}


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is disabled."""
    if os.environ.get("OPTIMUM_GEMMA3_DISABLE_COMPILE_CACHE", "").lower() in ("1", "true", "yes"):
        return None
    if "OPTIMUM_GEMMA3_CACHE_DIR" in os.environ:
        return Path(os.environ["OPTIMUM_GEMMA3_CACHE_DIR"])
    return cache_root() / "compiled"


# The compiler package's backend modules; this cache and the exporter (which records
# everything else that shapes a program in the key) are left out.
BACKEND_SOURCES = ("__init__.py", "base.py", "cpu.py", "neuron.py")


def graph_sources() -> list[Path]:
    """The files whose content decides what a compiled program computes: the graphs and
    the layers they call (the `graphs` package, its C++ kernels included) and the
    compiler backends (how they trace and compile)."""
    graph_root = Path(graphs.__file__).parent
    files = [path for path in graph_root.rglob("*") if path.suffix in (".py", ".cpp", ".h")]
    backend_root = Path(compiler.__file__).parent
    files += [backend_root / name for name in BACKEND_SOURCES]
    return sorted(files)


@functools.cache
def graph_source_digest() -> str:
    """sha256 of every `graph_sources` file's path and content, computed once per process."""
    digest = hashlib.sha256()
    for path in graph_sources():
        data = path.read_bytes()
        digest.update(f"{path.parent.name}/{path.name}:{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def program_key(text_config: dict, graph: dict, versions: dict) -> str:
    """Content address of one program: what the graph computes (architecture, shapes, ops
    profile and the source of graphs and kernels) and what compiled it."""
    architecture = {k: v for k, v in text_config.items() if k not in NON_GRAPH_CONFIG_KEYS}
    payload = json.dumps(
        {
            "config": architecture,
            "graph": graph,
            "versions": versions,
            "sources": graph_source_digest(),
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def fetch_cached(key: str, suffix: str, destination: Path) -> bool:
    """Copy the program `key` to `destination` if the compile cache holds it (True)."""
    root = cache_dir()
    entry = None if root is None else root / f"{key}{suffix}"
    if entry is None or not entry.is_file():
        return False
    logger.info("compile cache hit: %s", entry.name)
    shutil.copyfile(entry, destination)
    return True


def store_cached(key: str, suffix: str, compiled: Path) -> None:
    """Keep the just compiled program `key` (at `compiled`) in the compile cache.

    Entries are written atomically (temporary file, then rename), so an interrupted
    compile never leaves a truncated entry.
    """
    root = cache_dir()
    if root is not None:
        with replaced_atomically(root / f"{key}{suffix}") as tmp:
            shutil.copyfile(compiled, tmp)
