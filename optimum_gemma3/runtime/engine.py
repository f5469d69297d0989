"""A compiled artifact folder, loaded once and ready to run prefill and decode.

Loading checks before running: the export config parses and was written by compatible
versions of this library, torch and the compiler; this host can run the programs (its
CPU has the instruction set they were compiled for, and the C++ kernels their ops profile
calls load here); every program exists and matches its recorded checksum; the weights
are safetensors with exactly the expected tensors. It compiles nothing and needs no
model source for the programs.

Each rank engine owns its weights and one set of KV caches shared by all its programs;
callers pass user-sized batches and the runtime picks the smallest prefill bucket that
fits, left-aligns prompts into it and pads the batch up to the compiled batch size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, Gemma3TextConfig

from ..artifact.files import (
    NEURON_CONFIG_NAME,
    ArtifactError,
    decode_program_name,
    prefill_program_name,
    verify_file,
    weights_name,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..compiler import CompilerBackend, backend_for_target
from ..graphs import Gemma3Decoder, text_config
from ..graphs.decoder import head_weight_name
from ..graphs.program import cache_tensors, canonical
from ..version import __version__
from ..weights import check_tensors
from .head import HostHead
from .logits import NextTokenLogits
from .loop import left_align

logger = logging.getLogger(__name__)


def load_neuron_config(folder: Path) -> Gemma3NeuronConfig:
    """Read `neuron_config.json`, turning every failure into an error that names the file."""
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
    neuron_config: Gemma3NeuronConfig, backend: CompilerBackend, path: Path
) -> None:
    """Refuse, at load rather than at the first call, programs this host cannot run."""
    isa = neuron_config.program_isa
    if isa and not backend.runs_program_isa(isa):
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


class RankEngine:
    """One rank's programs, weights and KV caches: runs already padded, bucket-sized inputs.

    With one rank this is the whole model; with `tp_degree > 1` each rank process of a
    `RankPool` holds one, and the programs' collectives connect them.
    """

    def __init__(
        self,
        folder: Path,
        nc: Gemma3NeuronConfig,
        text: Gemma3TextConfig,
        rank: int = 0,
        token: str | bool | None = None,
    ):
        backend = backend_for_target(nc.target)

        def program(name: str):
            return backend.load(verify_file(folder, name, nc.artifact_files.get(name)))

        suffix = backend.program_suffix
        buckets = nc.context_encoding_buckets
        self.prefill_programs = {b: program(prefill_program_name(b, suffix)) for b in buckets}
        self.decode_program = program(decode_program_name(suffix))
        skeleton = Gemma3Decoder.skeleton(
            text, nc.batch_size, nc.sequence_length, nc.torch_dtype, nc.tp_degree
        )
        self.weights = canonical(_load_rank_weights(folder, nc, text, skeleton, rank, token))
        self.caches = {name: torch.zeros_like(t) for name, t in cache_tensors(skeleton).items()}

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.prefill_programs[ids.shape[1]](self.weights, self.caches, ids, mask)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decode_program(self.weights, self.caches, ids, positions)

    def close(self) -> None:
        """Nothing to stop: the programs and tensors go with the object."""


def _load_rank_weights(folder: Path, nc, text, skeleton, rank: int, token) -> dict:
    """Rank `rank`'s weights from the folder, or sharded from `checkpoint_id` (no weights)."""
    name = weights_name(rank, nc.tp_degree)
    if name in nc.artifact_files:
        path = verify_file(folder, name)
        try:
            weights = load_file(path)
        except (SafetensorError, OSError) as error:
            raise ArtifactError(f"{path} is not a readable safetensors file: {error}") from error
    else:
        # Exported with load_weights=False: the weights come from the source checkpoint.
        from ..compiler.export import rank_state_dicts, resolve_checkpoint

        path = resolve_checkpoint(nc.checkpoint_id, nc.checkpoint_revision, token)
        weights = rank_state_dicts(path, text, nc)[rank]
    try:
        check_tensors(weights, skeleton, path)
    except ValueError as error:
        raise ArtifactError(str(error)) from error
    return weights


class Gemma3Runtime:
    """A compiled folder ready to run: user-sized batches in, logits out.

    Checks the folder against this host, then runs it on one `RankEngine` in this process,
    or with `tp_degree > 1` on a `RankPool` of rank processes it starts and stops itself.
    Where the programs end at the final norm (`head_on_host`), it runs the head itself,
    computing each step's logits only as far as the caller reads them.
    """

    def __init__(self, folder: str | Path, token: str | bool | None = None):
        folder = Path(folder)
        self.folder = folder
        self.neuron_config = nc = load_neuron_config(folder)
        self.config = AutoConfig.from_pretrained(folder)
        backend = backend_for_target(nc.target)
        check_versions(nc, backend.versions(), folder)
        check_host_runs(nc, backend, folder)
        self.buckets = list(nc.context_encoding_buckets)
        self.pad_token_id = self.config.get_text_config().pad_token_id or 0
        text = text_config(self.config)
        if nc.tp_degree == 1:
            self.engine = RankEngine(folder, nc, text, token=token)
        else:
            from .pool import RankPool

            self.engine = RankPool(folder, nc, text.vocab_size, token)
        self.head = None
        if nc.head_on_host:
            self.head = HostHead(self.engine.weights[head_weight_name(text)], nc.ops_profile)

    def close(self) -> None:
        """Stop the rank processes of a tensor-parallel model (also done when collected)."""
        self.engine.close()

    @property
    def batch_size(self) -> int:
        return self.neuron_config.batch_size

    @property
    def sequence_length(self) -> int:
        return self.neuron_config.sequence_length

    @property
    def max_context_length(self) -> int:
        return self.neuron_config.max_context_length

    def bucket_for(self, prompt_length: int) -> int:
        """The smallest compiled prefill length that holds `prompt_length` tokens."""
        for bucket in self.buckets:
            if prompt_length <= bucket:
                return bucket
        raise ValueError(
            f"A prompt of {prompt_length} tokens exceeds max_context_length="
            f"{self.max_context_length} of this compiled model: shorten it or re-export with "
            "a larger max_context_length / sequence_length."
        )

    def _pad_batch(self, tensor: torch.Tensor, fill: int) -> torch.Tensor:
        rows = tensor.shape[0]
        if rows > self.batch_size:
            raise ValueError(
                f"Batch of {rows} rows exceeds the compiled batch_size={self.batch_size}: "
                "split the batch or re-export with a larger batch_size."
            )
        if rows == self.batch_size:
            return tensor
        padding = torch.full((self.batch_size - rows, *tensor.shape[1:]), fill, dtype=tensor.dtype)
        return torch.cat([tensor, padding])

    def _next_token_logits(self, output: torch.Tensor) -> NextTokenLogits:
        """A program's output rows as logits: its own, or those the head computes from it."""
        if self.head is None:
            return NextTokenLogits.of(output)
        return self.head.next_token_logits(output)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> NextTokenLogits:
        """Logits `[rows, V]` of each prompt's last token, computed as far as they are read;
        fills the caches of these rows."""
        rows = input_ids.shape[0]
        bucket = self.bucket_for(int(attention_mask.sum(-1).max()))
        ids, mask = left_align(input_ids, attention_mask, self.pad_token_id, bucket)
        ids, mask = self._pad_batch(ids, self.pad_token_id), self._pad_batch(mask, 0)
        return self._next_token_logits(self.engine.prefill(ids, mask)[:rows])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> NextTokenLogits:
        """Logits `[rows, V]` for one new token per row at `positions`, computed as far as
        they are read; updates the caches."""
        rows = input_ids.shape[0]
        if int(positions.max()) >= self.sequence_length:
            raise ValueError(
                f"Position {int(positions.max())} is beyond the compiled sequence_length="
                f"{self.sequence_length}."
            )
        ids = self._pad_batch(input_ids, self.pad_token_id)
        return self._next_token_logits(
            self.engine.decode(ids, self._pad_batch(positions, 0))[:rows]
        )
