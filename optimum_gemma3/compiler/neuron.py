"""The `neuron` backend: the AWS Neuron SDK (torch-neuronx). The only module importing it.

The SDK is installed from AWS's own package index (`pip install optimum-gemma3[neuronx]`
with that index configured); without it, this backend refuses with what to install.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from pathlib import Path

import torch

from .base import CompilerBackend, Program

SDK_PACKAGES = ("torch_neuronx", "neuronx_distributed", "libneuronxla")
SDK_DISTRIBUTIONS = ("torch-neuronx", "neuronx-cc", "neuronx-distributed")


def missing_sdk_packages() -> list[str]:
    """The Neuron SDK modules that cannot be imported here (empty when the SDK is usable)."""
    missing = []
    for module in SDK_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    return missing


class NeuronSdkMissingError(ImportError):
    pass


class NeuronBackend(CompilerBackend):
    name = "neuron"
    program_suffix = ".neuron.pt"

    def __init__(self):
        missing = missing_sdk_packages()
        if missing:
            raise NeuronSdkMissingError(
                "The neuron backend needs the AWS Neuron SDK; missing modules: "
                f"{', '.join(missing)}. "
                "Install it on a Trainium/Inferentia host with AWS's package index, e.g. "
                "`pip install optimum-gemma3[neuronx] --extra-index-url "
                "https://pip.repos.neuron.amazonaws.com`, or export with instance_type='cpu'."
            )
        import torch_neuronx

        self._torch_neuronx = torch_neuronx

    def versions(self) -> dict[str, str]:
        return {
            "compiler": "neuronx-cc",
            "compiler_version": importlib.metadata.version("neuronx-cc"),
            "torch_neuronx_version": importlib.metadata.version("torch-neuronx"),
        }

    def compile(
        self,
        program: torch.nn.Module,
        example_inputs: tuple,
        path: Path,
        dynamic_shapes: tuple | None = None,
    ) -> None:
        if dynamic_shapes is not None:  # Neuron graphs use the plain profile: one per bucket
            raise ValueError("The neuron backend compiles static shapes only.")
        # Weights stay out of the NEFF (inline_weights_to_neff=False): they are program
        # inputs here anyway, so one compiled artifact serves every fine-tune.
        traced = self._torch_neuronx.trace(
            program,
            example_inputs,
            inline_weights_to_neff=False,
            compiler_args=["--auto-cast", "none", "--model-type", "transformer"],
        )
        torch.jit.save(traced, str(path))

    def load(self, path: Path) -> Program:
        # TorchScript produced by torch_neuronx.trace, written by this backend at export.
        return torch.jit.load(str(path))
