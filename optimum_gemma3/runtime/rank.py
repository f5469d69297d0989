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
    layer_program_name,
    prefill_program_name,
    verify_file,
    verify_program_name,
    weights_name,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..compiler import CPU_TARGETS, backend_for_target
from ..graphs import Gemma3Decoder
from ..graphs.config import ImageTokens
from ..graphs.draft import draft_weights, quantize_projections
from ..graphs.program import (
    DECODE,
    DRAFT,
    LAST,
    PREFILL,
    VERIFY,
    cache_tensors,
    canonical,
    layer_part,
    layer_parts,
    layer_state,
)
from ..weights import check_tensors, rank_state_dicts, resolve_checkpoint
from .allocator import keep_freed_memory


class RankEngine:
    """One rank's programs, weights and KV caches: runs already padded, program-sized inputs.

    With one rank this is the whole model; with `tp_degree > 1` each rank process of a
    `RankPool` holds one, and the programs' collectives connect them. An artifact with
    `layer_programs` runs each pass layer by layer (`LayerPasses`).
    """

    def __init__(
        self,
        folder: Path,
        nc: Gemma3NeuronConfig,
        text: Gemma3TextConfig,
        rank: int = 0,
        token: str | bool | None = None,
        image_tokens: ImageTokens | None = None,
    ):
        backend = backend_for_target(nc.target)
        if nc.target in CPU_TARGETS:  # programs allocate their intermediates on the heap
            keep_freed_memory()

        def program(name: str):
            return backend.load(verify_file(folder, name, nc.artifact_files.get(name)))

        decoder = Gemma3Decoder.skeleton(
            text,
            nc.batch_size,
            nc.sequence_length,
            nc.torch_dtype,
            nc.tp_degree,
            nc.ops_profile,
            image_tokens,
        )
        self.weights = canonical(_load_rank_weights(folder, nc, text, decoder, rank, token))
        self.caches = cache_tensors(decoder)
        for cache in self.caches.values():
            cache.zero_()
        suffix = backend.program_suffix
        # Whether the artifact has the verify pass (speculative decoding's check).
        self.verifies = bool(nc.speculation_length)
        self.layer_passes = None
        # The self-draft's passes and caches (`graphs.draft`), where the artifact has them.
        self.draft_passes = self.draft_caches = None
        if nc.layer_programs:

            def pass_programs(kind: str) -> dict:
                return {
                    part: backend.flat_call(program(layer_program_name(kind, part, suffix)))
                    for part in layer_parts(text, kind)
                }

            kinds = (PREFILL, DECODE, VERIFY) if self.verifies else (PREFILL, DECODE)
            programs = {kind: pass_programs(kind) for kind in kinds}
            if nc.draft_quantization_dtype:
                draft = quantize_projections(
                    Gemma3Decoder.skeleton(
                        text, nc.batch_size, nc.sequence_length, nc.torch_dtype, ops=nc.ops_profile
                    )
                )
                self.draft_caches = cache_tensors(draft)
                for cache in self.draft_caches.values():
                    cache.zero_()
                weights = canonical(draft_weights(self.weights, draft))
                self.draft_passes = LayerPasses(
                    {DRAFT: pass_programs(DRAFT)}, draft, weights, self.draft_caches
                )
            self.layer_passes = LayerPasses(programs, decoder, self.weights, self.caches)
            return
        if nc.prefill_any_length:
            self.prefill_programs = {None: program(prefill_program_name(None, suffix))}
        else:
            buckets = nc.context_encoding_buckets
            self.prefill_programs = {b: program(prefill_program_name(b, suffix)) for b in buckets}
        self.decode_program = program(decode_program_name(suffix))
        if self.verifies:
            self.verify_program = program(verify_program_name(suffix))

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, *image_inputs
    ) -> torch.Tensor:
        """One prompt `[1, bucket]` (with one program for every length: any whole number
        of blocks) into cache row `slot` `[1]`, with its image features and token types
        where the artifact takes images."""
        if self.layer_passes is not None:
            return self.layer_passes.prefill(ids, mask, slot, *image_inputs)
        programs = self.prefill_programs
        program = programs[None] if None in programs else programs[ids.shape[1]]
        return program(self.weights, self.caches, ids, mask, slot, *image_inputs)

    def decode(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.layer_passes is not None:
            return self.layer_passes.decode(DECODE, ids, positions)
        return self.decode_program(self.weights, self.caches, ids, positions)

    def verify(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`[B, T]` consecutive tokens per row at `positions` `[B, T]`: every position's output."""
        if self.layer_passes is not None:
            return self.layer_passes.decode(VERIFY, ids, positions)
        return self.verify_program(self.weights, self.caches, ids, positions)

    def zero_caches(self) -> None:
        """Every cache back to the zeros it was loaded with (after the load-time warm-up)."""
        for cache in self.caches.values():
            cache.zero_()

    def close(self) -> None:
        """Nothing to stop: the programs and tensors go with the object."""


class LayerPasses:
    """Prefill, decode and verify passes run layer by layer through per-layer programs
    (`graphs.program.LayerProgram`), each layer with its own weights and caches.

    The embedding and decode's final norm run here, eagerly (a row lookup and a scale, one
    norm per token: small next to a layer); every call passes a flat list of tensors,
    prepared once per layer, so a call costs little beside the layer's own work.
    """

    def __init__(self, programs: dict, decoder: Gemma3Decoder, weights: dict, caches: dict):
        # The decoder embeds and norms; it holds the loaded weights, not copies.
        decoder.load_state_dict(weights, strict=False, assign=True)
        self.decoder = decoder.requires_grad_(False)
        config = decoder.config
        self.passes = {}  # per pass, each layer's program and flat weights and caches
        for kind, parts in programs.items():
            layers = []
            for index in range(config.num_hidden_layers):
                part = layer_part(config, kind, index)
                last = part == LAST
                state = [*layer_state(weights, index, last).values()]
                state += layer_state(caches, index, last).values()
                layers.append((parts[part], state))
            self.passes[kind] = layers

    def _run(self, kind: str, h: torch.Tensor, inputs: list[torch.Tensor]) -> torch.Tensor:
        for program, state in self.passes[kind]:
            (h,) = program([*state, h, *inputs])
        return h

    def prefill(
        self, ids: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, *image_inputs
    ) -> torch.Tensor:
        with torch.no_grad():
            h, mask, token_type_ids = self.decoder.embed_prompt(ids, mask, *image_inputs)
        token_types = [] if token_type_ids is None else [token_type_ids]
        return self._run(PREFILL, h, [mask, slot, *token_types])

    def decode(self, kind: str, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Pass `kind` (decode and the self-draft's: the last token's output; verify: every
        token's) of tokens `ids` `[B, T]` at `positions`."""
        with torch.no_grad():
            h = self._run(kind, self.decoder.embed(ids), [positions.reshape(ids.shape)])
            return self.decoder.final_norm(h, every_token=kind == VERIFY)


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
