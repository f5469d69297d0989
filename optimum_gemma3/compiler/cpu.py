"""The `cpu` backend: PyTorch's own ahead-of-time stack.

`torch.export` captures the static-shape program, then AOTInductor compiles it to
a shared library packaged in a `.pt2` archive, which loads without this package's model
source or a Python-level graph interpreter. Weights and caches are program inputs, so the
library holds no weights. Graphs call this package's CPU kernels where their ops profile
says so (the exporter gives them this host's), so the kernels are loaded before any
program runs. Measured on the real 270M (see README): the AOTInductor program decodes
several times faster than interpreting the exported graph, whose per-op Python overhead
dominates at batch 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._inductor import cpu_vec_isa

from ..graphs import kernels
from ..quiet import torch_treespec_deprecation_silenced
from .base import CompilerBackend, FlatProgram, Program

logger = logging.getLogger(__name__)


class CpuBackend(CompilerBackend):
    name = "cpu"
    program_suffix = ".pt2"

    def versions(self) -> dict[str, str]:
        return {
            "compiler": "torch-aotinductor",
            "compiler_version": torch.__version__,
            "program_isa": self.program_isa(),
        }

    def program_isa(self) -> str | None:
        """Inductor vectorizes a program's C++ for the widest ISA of the compiling host
        (e.g. 'avx512 avx512_vnni'; `ATEN_CPU_CAPABILITY=avx2` picks AVX2): a program
        compiled on an AVX-512 host does not run on an AVX2-only one."""
        isa = cpu_vec_isa.pick_vec_isa()
        return str(isa) if isa else None

    def runs_program_isa(self, isa: str) -> bool:
        """Whether this CPU has every feature `isa` names, read from the CPU as Inductor
        does before its trial builds, so hosts without a C++ compiler are answered too."""
        if platform.machine() in ("x86_64", "AMD64"):
            return set(isa.split()) <= set(cpu_vec_isa.x86_isa_checker())
        return isa in {str(valid) for valid in cpu_vec_isa.valid_vec_isa_list()}

    def compile(
        self,
        program: torch.nn.Module,
        example_inputs: tuple,
        path: Path,
        dynamic_shapes: tuple | None = None,
    ) -> None:
        # Non-strict: the graphs are plain tensor code, which running the Python under fake
        # tensors captures as well as TorchDynamo's bytecode tracing (strict) did (same ops
        # on the real 270M), in a quarter of the time: the 270M decode graph 25.5 -> 5.8 s,
        # the 1024-token prefill 29.7 -> 11.0 s, of about two minutes per program.
        with torch_treespec_deprecation_silenced():
            exported = torch.export.export(
                program, example_inputs, dynamic_shapes=dynamic_shapes, strict=False
            )
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path))

    def load(self, path: Path) -> Program:
        # Programs call the kernels through the dispatcher; the runtime has checked that
        # they load here if the artifact's ops profile uses them.
        kernels.load()
        with torch_treespec_deprecation_silenced(), _extraction_removed_after_load():
            return torch._inductor.aoti_load_package(str(path))

    def flat_call(self, program: Program) -> FlatProgram:
        # The loader's own entry point: the loaded program's `__call__` re-reads its input
        # spec and flattens the arguments on every call.
        return program.loader.run


_EXTRACTION_LOCK = threading.Lock()  # TMPDIR is the process's: one load at a time


@contextlib.contextmanager
def _extraction_removed_after_load() -> Iterator[None]:
    """Loads a package with its extracted files in a directory of ours, removed at once.

    Why: the loader unpacks each `.pt2` into a new `aotinductor_*` directory under the
    temporary directory and removes it only when the program is destroyed, which never
    happens in a process that is killed, or that exits with a model alive in a thread or a
    reference cycle: a CI run of the test suite left 54 such directories (2 MB each), a
    served model one set per restart. Once loaded, the library is mapped and none of the
    files is read again, so they are deleted as soon as the load returns. The loader finds
    the temporary directory through TMPDIR, which is process-wide, hence the lock.
    """
    with _EXTRACTION_LOCK:
        directory = tempfile.mkdtemp(prefix="optimum-gemma3-load-")
        previous = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = directory
        try:
            yield
        finally:
            if previous is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = previous
            shutil.rmtree(directory, ignore_errors=True)
