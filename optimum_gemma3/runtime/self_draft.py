"""The self-draft at run time: the model's int8 copy decoding greedily in its own KV caches.

It answers what `speculation.AssistantDrafts` asks of an assistant model (`prefill`,
`decode`, `save_positions`), so drafting and checking are the assistant's code.
Its layers run the artifact's self-draft programs (`graphs.draft`) with int8 copies of
the layers' projections, made at load; its head is the int8 copy of the vocabulary head
that the host head's screen already holds, so it costs no memory beyond the layers' copy
and its caches. Its prefill copies the target's caches, filled by the target's prefill
of the same prompts, and after each round it copies the entries the target's verify or
decode step just wrote (rejected positions put back): the draft always drafts from the
exact keys and values of the tokens so far, pays no prefill of its own and never decodes
a token only to store it.
"""

from __future__ import annotations

import torch

from ..graphs.program import DRAFT
from .engine import Gemma3Runtime
from .logits import NextTokenLogits


class SelfDraft:
    """The draft half of a `Gemma3Runtime` exported with `draft_quantization_dtype`, for
    rows in cache slots `0..rows-1` (as `speculative_greedy` runs them)."""

    def __init__(self, runtime: Gemma3Runtime):
        engine = runtime.engine
        if getattr(engine, "draft_passes", None) is None or runtime.head is None:
            raise ValueError(
                "This model was exported without a self-draft: re-export it with "
                "draft_quantization_dtype='int8' (and speculation_length=k) to use "
                "self_draft=True."
            )
        self.passes = engine.draft_passes
        self.caches = engine.draft_caches
        self.target_caches = engine.caches
        self.head_copy = runtime.head.screen  # (q8, scales): the screen's int8 head
        self.pad_token_id = runtime.pad_token_id
        self.batch_size = runtime.batch_size
        self.sequence_length = runtime.sequence_length

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Start from the caches the target's prefill of these prompts just filled."""
        for name, cache in self.caches.items():
            cache.copy_(self.target_caches[name])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> NextTokenLogits:
        """The draft's logits for one token per row at `positions`; the compiled batch's
        other rows decode padding at their own position 0 (their draft caches are unused)."""
        rows = input_ids.shape[0]
        ids = torch.full((self.batch_size, 1), self.pad_token_id, dtype=torch.long)
        ids[:rows] = input_ids.reshape(rows, 1)
        all_positions = torch.zeros(self.batch_size, dtype=torch.long)
        all_positions[:rows] = positions.reshape(-1)
        hidden = self.passes.decode(DRAFT, ids, all_positions)[:rows]
        # Computed when read: the head costs about as much as the layers.
        return NextTokenLogits(
            lambda: torch.ops.optimum_gemma3.quantized_linear(hidden, *self.head_copy)
        )

    # `AssistantDrafts` need not decode the last draft to store it: `TargetEntries` copies it.
    takes_target_entries = True

    def save_positions(self, positions: torch.Tensor, width: int, slots=None) -> TargetEntries:
        """The round's `width` positions from each row's `positions`, whose entries the
        draft takes from the target's caches once the target has judged them."""
        starts = torch.zeros(self.batch_size, dtype=torch.long)
        starts[: len(positions)] = positions.reshape(-1)
        if int(starts.max()) + width > self.sequence_length:
            raise ValueError(
                f"Positions up to {int(starts.max()) + width - 1} are beyond the compiled "
                f"sequence_length={self.sequence_length}."
            )
        return TargetEntries(self.caches, self.target_caches, starts[:, None] + torch.arange(width))


class TargetEntries:
    """The target's cache entries at a round's positions `[B, T]`, copied into the draft's
    caches when the round ends (`keep`): after the target's own rollback, they are the
    accepted tokens' exact keys and values and, past them, what the slots held before."""

    def __init__(self, caches: dict, target_caches: dict, positions: torch.Tensor):
        self.caches = caches
        self.target_caches = target_caches
        self.rows = torch.arange(positions.shape[0])[:, None].expand_as(positions)
        self.positions = positions

    def keep(self, counts: torch.Tensor) -> None:
        """Copy the round's entries (whatever `counts` the target kept: it has already put
        back the rest)."""
        for name, cache in self.caches.items():
            slots = self.positions % cache.shape[2]
            cache[self.rows, :, slots] = self.target_caches[name][self.rows, :, slots]
