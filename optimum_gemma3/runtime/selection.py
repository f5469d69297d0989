"""How a step picks its token from as few exact logits as give the same choice.

A greedy or top-k sampling step asks the head only for the logits its selection can pick,
where the head can say which those are (`NextTokenLogits.near_top`) and the processors and
stopping criteria allow it; everything else computes every logit, as transformers does.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from transformers.generation import (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from .logits import NextTokenLogits

# Processors that only set some logits to -inf (transformers 4.57): after them the k
# largest logits are still exact ones of `near_top(k)`, unless masking left fewer than k
# of those at or above its `floor`, which the step checks.
MASKING_PROCESSORS = (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
)
# Temperatures a screened step divides by: every token `near_top` leaves out is below its
# floor by a relative margin of at least 2^-20 (see screened_linear.cpp), which fp32
# division (relative error 2^-24) keeps, as long as the quotients stay far from fp32's
# underflow and overflow; so the left-out tokens stay below the k-th largest score.
SCREENED_TEMPERATURES = (1e-4, 1e4)
# Above this top_k, sampling computes every logit. The screen computes about 2-4 k logits
# exactly, so its gain shrinks with k: on the real 270M's head, k = 1024 still costs
# under half of every logit and k = 4096 about two thirds (docs/performance.md). Larger
# top_k values are rare and unmeasured.
MAX_SCREENED_TOP_K = 1024
# The masking processors whose ids at a step depend only on the sequence's length
# (`masked_token_ids`): applied by setting those ids, without a vocabulary-wide mask.
ID_MASKING_PROCESSORS = (
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    SuppressTokensLogitsProcessor,
    SuppressTokensAtBeginLogitsProcessor,
)
_NO_TOKENS = torch.empty(0, dtype=torch.long)


@dataclass(frozen=True)
class ScreenedSelection:
    """How a step selects its token from `near_top(k)` instead of every logit.

    `before` (masking processors, a moderate temperature) keeps the order of the logits it
    does not mask, so a row's k largest scores after it are exact logits of `near_top(k)`
    whenever at least k of those at or above the floor survive it. Then `after` (the top-k
    warper, and whatever follows it) sees exactly the scores it would see with every
    logit: the same k largest, everything else removed either way.
    """

    k: int
    before: list
    after: list


def screened_selection(logits_processor, do_sample: bool) -> ScreenedSelection | None:
    """The screened form of greedy selection (k = 1) or of top-k sampling with these
    processors, or None where a step needs every logit: a processor before top-k that
    changes values or order (repetition penalty, ...), sampling without top-k. Types match
    exactly: a subclass may change more. Stopping criteria do not matter: as in
    transformers, they see scores only when every step's scores are kept anyway.
    """
    processors = _members(logits_processor)
    split = next((i for i, p in enumerate(processors) if not _keeps_order(p)), len(processors))
    before, after = processors[:split], processors[split:]
    if not do_sample:
        return ScreenedSelection(1, before, after) if not after else None
    if after and type(after[0]) is TopKLogitsWarper and after[0].top_k <= MAX_SCREENED_TOP_K:
        return ScreenedSelection(after[0].top_k, before, after)
    return None


def _keeps_order(processor) -> bool:
    if type(processor) is TemperatureLogitsWarper:
        low, high = SCREENED_TEMPERATURES
        return low <= processor.temperature <= high
    return type(processor) in MASKING_PROCESSORS


def _members(processors) -> list:
    """The members of a transformers list; a bare callable is its own (unknown) member."""
    if processors is None:
        return []
    if isinstance(processors, list):
        return processors
    return [processors]


def step_scores(
    step: NextTokenLogits,
    sequences: torch.Tensor,
    logits_processor,
    screen: ScreenedSelection | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's fp32 logits and processed scores; with `screen`, only the logits its
    selection can pick (the rest -inf) while that gives the same scores to select from."""
    if screen is not None:
        logits, floor = step.near_top(screen.k)
        logits = logits.float()
        if not screen.before:  # near_top's promise: k of its logits reach `floor`
            return logits, apply_processors(screen.after, sequences, logits)
        scores = apply_processors(screen.before, sequences, logits)
        if screened_top(logits, scores, floor, screen.k) is not None:
            return logits, apply_processors(screen.after, sequences, scores)
    logits = step.full().float()
    return logits, logits if logits_processor is None else logits_processor(sequences, logits)


def screened_top(
    logits: torch.Tensor, scores: torch.Tensor, floor: torch.Tensor, k: int
) -> torch.Tensor | None:
    """Each row's k largest `scores` `[rows, k]` (k = 1: the first largest), where they are
    all exact logits of `near_top` at or above the row's `floor` and unmasked; else None:
    masking removed too many of the exact candidates, and any token may be among the k
    largest (the caller then computes every logit).

    `scores` are `logits` after processors that keep the order of what they do not mask
    (`ScreenedSelection.before`), and every token `near_top` left out is below `floor`, so
    the k largest scores are such survivors exactly when at least k survive: checking
    those k is enough. Why not count the survivors: comparing all 262144 logits to the
    floor costs a vocabulary-wide pass per row (about 0.4 ms a row on an AVX2 host, 2 ms
    for a verify call's 5 positions), the k largest a fraction of that. Ties and NaN can
    only make this answer None where counting would not, never the other way round.
    """
    if k == 1:
        top = first_argmax(scores)[:, None]
    else:
        top = scores.topk(min(k, scores.shape[-1]), dim=-1).indices
    rows = torch.arange(len(scores))[:, None]
    survive = (scores[rows, top] > -torch.inf) & (logits[rows, top] >= floor[:, None])
    return top if bool(survive.all()) else None


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` of `[rows, V]` scores, the same indices (each row's first
    largest, a NaN counting as largest), found through the maxima of about sqrt(V) blocks.

    Why: torch's argmax over one 262144-wide row is a scalar loop and amax a vectorized
    one; this is about 3x faster for one row and 7x for four. The block
    holding a row's first largest is the first block whose maximum equals it (amax
    propagates NaN as argmax ranks it), and within it argmax finds the same index.
    """
    rows, width = scores.shape
    block = _block_width(width)
    blocks = scores.reshape(rows, width // block, block)
    best_block = blocks.amax(-1).argmax(-1)
    within = blocks[torch.arange(rows), best_block].argmax(-1)
    return best_block * block + within


@functools.cache
def _block_width(width: int) -> int:
    """The smallest divisor of `width` that is at least its square root."""
    return next(d for d in range(math.isqrt(width - 1) + 1, width + 1) if width % d == 0)


def apply_processors(
    processors: list, sequences: torch.Tensor, scores: torch.Tensor
) -> torch.Tensor:
    """The processors' scores, in order; masking ones set their ids (`masked_token_ids`)."""
    for processor in processors:
        if type(processor) in ID_MASKING_PROCESSORS:  # its own result, without its mask
            masked = masked_token_ids(processor, sequences.shape[-1], scores.shape[-1])
            scores = scores.index_fill(-1, masked, -math.inf)
        else:
            scores = processor(sequences, scores)
    return scores


def masked_token_ids(processor, length: int, vocab_size: int) -> torch.Tensor:
    """The token ids (int64, within the vocabulary) that one of `ID_MASKING_PROCESSORS`
    sets to -inf at a step whose sequences are `length` tokens long (transformers 4.57's
    rules; ids outside the vocabulary are ignored, as its `isin` over it ignores them).

    Why: each of them builds a mask over the whole vocabulary (`isin` of an `arange`) at
    every call, 0.6-2.7 ms for Gemma-3's 262144 tokens, up to a seventh of a bf16 decode
    step of the 270M, paid at every position a verify call checks; setting the few ids
    directly gives the same scores (tests/test_head.py compares them with the processors').
    """
    kind = type(processor)
    if kind is MinNewTokensLengthLogitsProcessor:
        active = length - processor.prompt_length_to_skip < processor.min_new_tokens
        ids = processor.eos_token_id if active else _NO_TOKENS
    elif kind is MinLengthLogitsProcessor:
        ids = processor.eos_token_id if length < processor.min_length else _NO_TOKENS
    elif kind is SuppressTokensLogitsProcessor:
        ids = processor.suppress_tokens
    elif kind is SuppressTokensAtBeginLogitsProcessor:
        active = length == processor.begin_index
        ids = processor.begin_suppress_tokens if active else _NO_TOKENS
    else:
        raise TypeError(f"{kind.__name__} is not one of ID_MASKING_PROCESSORS")
    return ids[(ids >= 0) & (ids < vocab_size)].long()
