"""One rank's programs, weights and KV caches, loaded from a checked artifact folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import Gemma3TextConfig

from ..artifact.files import (
    ArtifactError,
    decode_program_name,
    prefill_program_name,
    verify_file,
    verify_program_name,
    weights_name,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..compiler import backend_for_target
from ..graphs import Gemma3Decoder
from ..graphs.program import cache_tensors, canonical
from ..weights import check_tensors, rank_state_dicts, resolve_checkpoint


class RankEngine:
    """One rank's programs, weights and KV caches: runs already padded, program-sized inputs.

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
        if nc.prefill_any_length:
            self.prefill_programs = {None: program(prefill_program_name(None, suffix))}
        else:
            buckets = nc.context_encoding_buckets
            self.prefill_programs = {b: program(prefill_program_name(b, suffix)) for b in buckets}
        self.decode_program = program(decode_program_name(suffix))
        self.verify_program = None
        if nc.speculation_length:
            self.verify_program = program(verify_program_name(suffix))
        skeleton = Gemma3Decoder.skeleton(
            text, nc.batch_size, nc.sequence_length, nc.torch_dtype, nc.tp_degree
        )
        self.weights = canonical(_load_rank_weights(folder, nc, text, skeleton, rank, token))
        self.caches = {name: torch.zeros_like(t) for name, t in cache_tensors(skeleton).items()}

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, *image_inputs
    ) -> torch.Tensor:
        """One prompt `[1, bucket]` (with one program for every length: any whole number
        of blocks) into cache row `slot` `[1]`, with its image features and token types
        where the artifact takes images."""
        programs = self.prefill_programs
        program = programs[None] if None in programs else programs[ids.shape[1]]
        return program(self.weights, self.caches, ids, mask, slot, *image_inputs)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decode_program(self.weights, self.caches, ids, positions)

    def verify(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`[B, T]` consecutive tokens per row at `positions` `[B, T]`: every position's output."""
        return self.verify_program(self.weights, self.caches, ids, positions)

    def zero_caches(self) -> None:
        """Every cache back to the zeros it was loaded with (after the load-time warm-up)."""
        for cache in self.caches.values():
            cache.zero_()

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
        path = resolve_checkpoint(nc.checkpoint_id, nc.checkpoint_revision, token)
        weights = rank_state_dicts(path, text, nc)[rank]
    try:
        check_tensors(weights, skeleton, path)
    except ValueError as error:
        raise ArtifactError(str(error)) from error
    return weights
