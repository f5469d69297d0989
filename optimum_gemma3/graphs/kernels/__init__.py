"""This package's CPU kernels: C++ ops built once per host and torch version, then loaded.

- `skinny_linear.cpp`: `torch.ops.optimum_gemma3.skinny_linear`, decode-sized products
  streaming each weight once;
- `screened_linear.cpp`: `torch.ops.optimum_gemma3.screened_linear`, the exact logits of
  only the tokens that can be among a row's k largest (greedy and top-k sampling steps),
  screened with the int8 head copy `torch.ops.optimum_gemma3.quantize_rows` makes;
- `quantized_linear.cpp`: `torch.ops.optimum_gemma3.quantized_linear`, few-row products
  of such an int8 copy (the self-draft's weights);
- `decode_attention.cpp`: `torch.ops.optimum_gemma3.decode_attention`, one query token
  per row over the filled slots of its KV cache, in the cache's dtype;
- `dense.cpp`: `torch.ops.optimum_gemma3.dense`, oneDNN's fp32 product for many rows
  (prefill), callable from a compiled program without Python.
Each file says why. The `cpu` backend's AOTInductor programs call them through the
dispatcher, so they must be loaded before such a program runs: `CpuBackend.load` calls
`load()`.

Built with the C++ compiler AOTInductor itself needs (`$CXX`, else `g++`), against the
running torch, into `$XDG_CACHE_HOME/optimum-gemma3/kernels` (default `~/.cache/...`),
named by a hash of the source, flags and torch version, and written atomically so that
concurrent processes (tensor-parallel ranks, parallel tests) never load a partial file.
`OPTIMUM_GEMMA3_DISABLE_KERNELS=1` turns them off (programs then use BLAS products).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path

import torch
from torch.utils.cpp_extension import include_paths, library_paths

from ...paths import cache_root, replaced_atomically

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
SOURCES = tuple(
    HERE / name
    for name in (
        "skinny_linear.cpp",
        "screened_linear.cpp",
        "quantized_linear.cpp",
        "decode_attention.cpp",
        "dense.cpp",
    )
)
HEADERS = tuple(
    HERE / name for name in ("vector.h", "linear_shapes.h", "row_products.h", "screen_products.h")
)
# The most input rows one call of the few-row products takes (screened_linear's limit;
# skinny_linear takes more in blocks of this size). The C++ side reads it from FLAGS.
MAX_ROWS = 8
FLAGS = (
    "-O3",
    "-mavx2",
    "-mfma",
    "-fopenmp",
    "-std=c++17",
    "-shared",
    "-fPIC",
    f"-DOPTIMUM_GEMMA3_MAX_ROWS={MAX_ROWS}",
)
# The CPU features FLAGS compile for, recorded with a profile that calls the kernels.
REQUIRED_ISA = "avx2+fma"
# CPU capabilities (torch.backends.cpu.get_cpu_capability) that have AVX2 and FMA.
SUPPORTED_CAPABILITIES = ("AVX2", "AVX512")


def kernels_dir() -> Path:
    return cache_root() / "kernels"


def _compile_command(compiler: str, output: Path) -> list[str]:
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    return [
        compiler,
        *FLAGS,
        abi,
        *(f"-I{path}" for path in include_paths()),
        *(str(source) for source in SOURCES),
        *(f"-L{path}" for path in library_paths()),
        "-lc10",
        "-ltorch_cpu",
        "-o",
        str(output),
    ]


def _build() -> Path:
    """The kernel library for this torch and source, compiling it on the first call."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise OSError("no C++ compiler ($CXX or g++) on PATH")
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    identity = "\n".join([*texts, " ".join(FLAGS), compiler, torch.__version__])
    folder = kernels_dir()
    library = folder / f"kernels-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.so"
    if library.is_file():
        return library
    logger.info("Compiling optimum-gemma3 CPU kernels into %s (once per torch version)", library)
    with replaced_atomically(library) as tmp:
        result = subprocess.run(
            _compile_command(compiler, tmp), capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise OSError(f"{compiler} failed:\n{result.stderr[-4000:]}")
    return library


def _disabled() -> bool:
    return os.environ.get("OPTIMUM_GEMMA3_DISABLE_KERNELS", "").lower() in ("1", "true", "yes")


def unavailable_reason() -> str:
    """Why `load()` returns False here, in words for an error message."""
    if _disabled():
        return "OPTIMUM_GEMMA3_DISABLE_KERNELS is set"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in SUPPORTED_CAPABILITIES:
        return f"the CPU lacks {REQUIRED_ISA} (torch reports CPU capability {capability})"
    return "building them failed (the warning logged when they were first needed says why)"


@functools.cache
def load() -> bool:
    """Load the kernels (building them if needed); False where they cannot run here."""
    if _disabled():
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in SUPPORTED_CAPABILITIES:
        logger.info("No optimum-gemma3 CPU kernels for CPU capability %s", capability)
        return False
    try:
        library = _build()
    except OSError as error:
        logger.warning("optimum-gemma3 CPU kernels unavailable, using BLAS products: %s", error)
        return False
    torch.ops.load_library(str(library))
    return True
