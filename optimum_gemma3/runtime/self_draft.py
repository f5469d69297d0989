"""The self-draft at run time: the model's int8 copy decoding greedily in its own KV caches.

It answers what `speculation.AssistantDrafts` asks of an assistant model (`prefill`,
`decode`, `save_positions`), so drafting and checking are the assistant's code.
Its layers run the artifact's self-draft programs (`graphs.draft`) with int8 copies of
the layers' projections, made at load; its head (`DraftHead`) reads part of the int8 copy
of the vocabulary head that the host head's screen already holds, so it costs no memory
beyond the layers' copy and its caches. Its prefill copies the target's caches, filled
by the target's prefill of the same prompts, and after each round it copies the entries
the target's verify or decode step just wrote (rejected positions put back): the draft
always drafts from the exact keys and values of the tokens so far, pays no prefill of its
own and never decodes a token only to store it.
"""

from __future__ import annotations

import torch

from ..graphs.program import DRAFT
from .engine import Gemma3Runtime
from .logits import NextTokenLogits

# The ids the self-draft can always draft (`DraftHead`), in Gemma-3's tokenizer (every
# size's): it numbers its 236743 merged pieces in the order it merged them, the most
# frequent first, then its single characters by frequency from 236743 ('▁', 'e', 't', ...,
# '.', digits, Cyrillic, CJK). With the request's own tokens, the first 32768 pieces and
# 1024 characters hold 97% of the real 270M's greedy prose tokens, every token of a
# grounded code continuation and 90% of its samples at temperature 1 (in many languages),
# for an eighth of the head's rows (docs/performance.md).
DRAFT_VOCABULARY = (range(0, 32768), range(236743, 236743 + 1024))


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
        self.head = DraftHead(*runtime.head.screen)
        self.pad_token_id = runtime.pad_token_id
        self.batch_size = runtime.batch_size
        self.sequence_length = runtime.sequence_length

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        """Start from the caches the target's prefill of these prompts just filled."""
        self.head.start(input_ids[attention_mask.bool()])
        for name, cache in self.caches.items():
            cache.copy_(self.target_caches[name])

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> NextTokenLogits:
        """The draft's logits for one token per row at `positions`; the compiled batch's
        other rows decode padding at their own position 0 (their draft caches are unused)."""
        rows = input_ids.shape[0]
        self.head.add(input_ids)  # the target's last token may be one the draft lacks
        ids = torch.full((self.batch_size, 1), self.pad_token_id, dtype=torch.long)
        ids[:rows] = input_ids.reshape(rows, 1)
        all_positions = torch.zeros(self.batch_size, dtype=torch.long)
        all_positions[:rows] = positions.reshape(-1)
        hidden = self.passes.decode(DRAFT, ids, all_positions)[:rows]
        return NextTokenLogits(lambda: self.head.logits(hidden))  # computed when read

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


class DraftHead:
    """The draft's vocabulary head: int8 logits of the tokens a draft is likely to be,
    -inf for the others.

    Why not every token: the whole int8 head (168 MB for 262144 x 640) costs about as
    much as the draft's layers, and a draft step must cost a small part of a target step
    for speculation to pay. The draft vocabulary is `DRAFT_VOCABULARY`'s id ranges and
    every token of the request so far: its prompts (names, code identifiers, the script
    it is written in) and the target's tokens. A token outside it is never drafted, which
    costs a rejected draft, never a wrong token: the target checks every draft.
    """

    def __init__(self, q8: torch.Tensor, scales: torch.Tensor):
        self.q8, self.scales = q8, scales
        vocabulary = len(q8)
        self.ranges = [
            slice(ids.start, min(ids.stop, vocabulary))
            for ids in DRAFT_VOCABULARY
            if ids.start < vocabulary
        ]
        self.in_ranges = torch.zeros(vocabulary, dtype=torch.bool)
        for ids in self.ranges:
            self.in_ranges[ids] = True
        self.start(torch.zeros(0, dtype=torch.long))

    def start(self, request_ids: torch.Tensor) -> None:
        """A new request: its context tokens are `request_ids` (the prompts' tokens)."""
        self.context = torch.zeros(0, dtype=torch.long)
        self.add(request_ids)

    def add(self, token_ids: torch.Tensor) -> None:
        """Draft these tokens from now on too (a copy of their few int8 rows)."""
        new = token_ids.reshape(-1).unique()
        new = new[~self.in_ranges[new] & ~torch.isin(new, self.context)]
        if len(new):
            self.context = torch.cat([self.context, new])
            self.context_rows = (self.q8[self.context], self.scales[self.context])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """`[rows, V]` int8 logits of the draft vocabulary, -inf elsewhere."""
        product = torch.ops.optimum_gemma3.quantized_linear
        logits = torch.full((*hidden.shape[:-1], len(self.q8)), -torch.inf, dtype=hidden.dtype)
        for ids in self.ranges:  # slices of the int8 copy: views, no copy
            logits[..., ids] = product(hidden, self.q8[ids], self.scales[ids])
        if len(self.context):
            logits[..., self.context] = product(hidden, *self.context_rows)
        return logits


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
