"""Compiler backends, `cpu` (PyTorch AOTInductor) and `neuron` (AWS Neuron SDK), the compile
cache that keys their programs (`cache`) and the exporter that writes a folder (`export`)."""

from __future__ import annotations

from ..constants import CPU_TARGETS, NEURON_TARGETS, TARGETS
from .base import CompilerBackend, Program


def backend_for_target(target: str) -> CompilerBackend:
    """The backend that compiles for `target`; the Neuron SDK is imported only here, on demand."""
    if target in CPU_TARGETS:
        from .cpu import CpuBackend

        return CpuBackend()
    if target in NEURON_TARGETS:
        from .neuron import NeuronBackend

        return NeuronBackend()
    raise ValueError(f"Unknown target {target!r}: expected one of {', '.join(TARGETS)}.")


__all__ = [
    "CPU_TARGETS",
    "NEURON_TARGETS",
    "TARGETS",
    "CompilerBackend",
    "Program",
    "backend_for_target",
]
