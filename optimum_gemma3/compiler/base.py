"""The compiler backend interface: turn one graph program into a file, and load it back.

A backend knows nothing about Gemma-3: it receives a `GraphProgram` (a pure function of
weights, caches and inputs) with static example inputs, and must return, from `load`,
a callable with the same signature. Adding a backend (e.g. `cuda`) is one new module.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

Program = Callable[..., torch.Tensor]
FlatProgram = Callable[[list[torch.Tensor]], list[torch.Tensor]]


class CompilerBackend(ABC):
    name: str
    # File name suffix of one compiled program (one per graph and bucket).
    program_suffix: str

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the compiler stack that a program depends on, recorded at export and
        checked at load: a mismatch means the program may not load or may compute otherwise."""

    def program_isa(self) -> str | None:
        """The CPU instruction set that programs compiled here need (None: not CPU code).

        Recorded at export, part of compile-cache keys, and checked at load
        (`runs_program_isa`): a program built for wider vectors cannot run on a CPU without
        them."""
        return None

    def runs_program_isa(self, isa: str) -> bool:
        """Whether this host runs programs that need `isa` (a `program_isa` value)."""
        return True

    @abstractmethod
    def compile(
        self,
        program: torch.nn.Module,
        example_inputs: tuple,
        path: Path,
        dynamic_shapes: tuple | None = None,
    ) -> None:
        """Compile `program` for the shapes of `example_inputs` and write it to `path`; the
        dims `dynamic_shapes` (`torch.export`'s form) names take any size in their range."""

    @abstractmethod
    def load(self, path: Path) -> Program:
        """Load a compiled program; calling it runs it (caches are updated in place)."""

    def flat_call(self, program: Program) -> FlatProgram:
        """`program` called on its input tensors in flattened order (as `torch.utils._pytree`
        flattens its arguments), returning its flattened outputs: for callers that call a
        program many times a step (per-layer programs) and keep their inputs flat."""
        raise NotImplementedError(f"The {self.name} backend has no flat program calls.")
