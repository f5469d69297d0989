"""The checks an artifact folder passes before anything runs it.

Its export config parses and was written by the versions of this library, torch and the
compiler found here, and this host can run its programs (the instruction set they were
compiled for, the C++ kernels their ops profile calls).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..version import __version__
from .files import NEURON_CONFIG_NAME, ArtifactError, looks_like_unfinished_save, verify_file
from .neuron_config import Gemma3NeuronConfig


def load_neuron_config(folder: Path) -> Gemma3NeuronConfig:
    """Read `neuron_config.json`, turning every failure into an error that names the file."""
    if looks_like_unfinished_save(folder):
        raise ArtifactError(
            f"{folder} holds an unfinished save (it was interrupted: {NEURON_CONFIG_NAME} is "
            "missing while programs or a staging folder are there). Save or export the model "
            "into it again, or load it from where it came from."
        )
    path = verify_file(folder, NEURON_CONFIG_NAME)
    try:
        config = Gemma3NeuronConfig.from_pretrained(folder)
    except (ValueError, RuntimeError, OSError, TypeError, AssertionError) as error:
        raise ArtifactError(f"{path} cannot be used: {error}") from error
    if not isinstance(config, Gemma3NeuronConfig):
        raise ArtifactError(f"{path} was not written by optimum-gemma3.")
    return config


def check_versions(neuron_config: Gemma3NeuronConfig, versions: dict[str, str], path: Path):
    """Refuse an artifact compiled by another library, torch or compiler version."""
    here = {
        "optimum_gemma3_version": __version__,
        "torch_version": torch.__version__,
        "compiler": versions["compiler"],
        "compiler_version": versions["compiler_version"],
    }
    for field, current in here.items():
        recorded = getattr(neuron_config, field)
        if recorded != current:
            raise ArtifactError(
                f"{path / NEURON_CONFIG_NAME} records {field}={recorded!r} but this host has "
                f"{current!r}: compiled programs are tied to the versions that built them. "
                "Re-export the model here, or install the recorded versions."
            )


def check_host_runs(
    neuron_config: Gemma3NeuronConfig, runs_program_isa: Callable[[str], bool], path: Path
) -> None:
    """Refuse, at load rather than at the first call, programs this host cannot run.

    `runs_program_isa`: the backend's answer to whether this host runs programs compiled
    for an instruction set.
    """
    isa = neuron_config.program_isa
    if isa and not runs_program_isa(isa):
        raise ArtifactError(
            f"{path / NEURON_CONFIG_NAME} records program_isa={isa!r}: its programs were "
            "compiled for CPUs with these instructions, and this CPU lacks them. Re-export "
            "the model on this host (or export with ATEN_CPU_CAPABILITY=avx2 for programs "
            "every AVX2 CPU runs)."
        )
    missing = neuron_config.ops_profile.missing_on_host()
    if missing is not None:
        raise ArtifactError(
            f"{path / NEURON_CONFIG_NAME} records ops_profile="
            f"{neuron_config.ops_profile.to_dict()}: {missing}. Re-export the model on this "
            "host (its programs then use the forms this host has), or load it on a host "
            "where the kernels load."
        )
