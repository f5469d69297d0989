"""Host-side token loop around the prefill and decode graphs.

The graphs only see static shapes; this module turns a user batch into them (left
alignment, bucket padding) and runs transformers' token loop over them: logits
processors, greedy or multinomial selection, EOS rows continuing with `pad_token_id`,
stopping criteria and streamers. A greedy or top-k sampling step asks the head only for
the logits its selection can pick, where the head can say which those are
(`NextTokenLogits.near_top`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers.generation import (
    EosTokenCriteria,
    MaxLengthCriteria,
    MaxTimeCriteria,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    StopStringCriteria,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

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
# Stopping criteria that never read the scores they are given.
SCORE_BLIND_CRITERIA = (MaxLengthCriteria, MaxTimeCriteria, EosTokenCriteria, StopStringCriteria)
# Temperatures a screened step divides by: every token `near_top` leaves out is below its
# floor by a relative margin of at least 2^-20 (see screened_linear.cpp), which fp32
# division (relative error 2^-24) keeps, as long as the quotients stay far from fp32's
# underflow and overflow; so the left-out tokens stay below the k-th largest score.
SCREENED_TEMPERATURES = (1e-4, 1e4)
# Above this top_k, sampling computes every logit. The screen computes about 2-4 k logits
# exactly, so its gain shrinks with k: on the real 270M's head (fp32, one row), k = 64
# took 13.4 ms and 198 exact logits, k = 1024 14.5 ms and 2486, k = 4096 21.9 ms and
# 8547, against 33.3 ms for every logit. Larger top_k values are rare and unmeasured.
MAX_SCREENED_TOP_K = 1024


class NextTokenLogits:
    """One step's next-token logits `[rows, V]`, computed only as far as they are used.

    `full()`: every exact logit. `near_top(k)`: the exact logit of every token that can be
    among its row's k largest, -inf elsewhere, and per row a `floor` that at least k of
    those logits reach and every other token's logit is below; a head that cannot screen
    returns the full logits and a floor of -inf. Each is computed on its first call and kept.
    """

    def __init__(
        self,
        full: Callable[[], torch.Tensor],
        near_top: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self._compute_full = full
        self._compute_near_top = near_top
        self._full: torch.Tensor | None = None
        self._near_top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, logits: torch.Tensor) -> NextTokenLogits:
        """Logits already computed in full."""
        return cls(lambda: logits)

    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = self._compute_full()
        return self._full

    def near_top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compute_near_top is None:
            logits = self.full()
            return logits, torch.full((logits.shape[0],), -torch.inf)
        if k not in self._near_top:
            self._near_top[k] = self._compute_near_top(k)
        return self._near_top[k]


PrefillFn = Callable[[torch.Tensor, torch.Tensor], NextTokenLogits]
DecodeFn = Callable[[torch.Tensor, torch.Tensor], NextTokenLogits]


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


def screened_selection(
    logits_processor, stopping_criteria, do_sample: bool
) -> ScreenedSelection | None:
    """The screened form of greedy selection (k = 1) or of top-k sampling with these
    processors and criteria, or None where a step needs every logit: a processor before
    top-k that changes values or order (repetition penalty, ...), sampling without top-k,
    a criterion that reads scores. Types match exactly: a subclass may read or change more.
    """
    if not all(type(c) in SCORE_BLIND_CRITERIA for c in _members(stopping_criteria)):
        return None
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


def _members(processors_or_criteria) -> list:
    """The members of a transformers list; a bare callable is its own (unknown) member."""
    if processors_or_criteria is None:
        return []
    if isinstance(processors_or_criteria, list):
        return processors_or_criteria
    return [processors_or_criteria]


def _step_scores(
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
            return logits, _apply(screen.after, sequences, logits)
        scores = _apply(screen.before, sequences, logits)
        # Every token left out is below `floor`: with k survivors at or above it, the k
        # largest scores are all here. Otherwise masking removed too many of the exact
        # candidates, and any token may be among them.
        survivors = ((scores > -torch.inf) & (logits >= floor[:, None])).sum(-1)
        if bool((survivors >= min(screen.k, logits.shape[-1])).all()):
            return logits, _apply(screen.after, sequences, scores)
    logits = step.full().float()
    return logits, logits if logits_processor is None else logits_processor(sequences, logits)


def first_argmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.argmax(-1)` of `[rows, V]` scores, the same indices (each row's first
    largest, a NaN counting as largest), found through the maxima of about sqrt(V) blocks.

    Why: torch's argmax over one 262144-wide row is a scalar loop (0.29 ms per row here)
    and amax a vectorized one; this takes 0.09 ms for one row, 0.18 ms for four. The block
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


def _apply(processors: list, sequences: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(sequences, scores)
    return scores


def left_align(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_token_id: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the right end of a `length`-wide batch.

    Accepts left-, right- or un-padded input, wider or narrower than `length` as long as
    every row's real tokens fit; the graphs require left padding with contiguous real
    tokens, which is what this returns.
    """
    attention_mask = attention_mask.to(torch.long)
    lengths = attention_mask.sum(-1)
    if int(lengths.max()) > length:
        raise ValueError(f"Cannot fit a prompt of {int(lengths.max())} tokens into {length}.")
    # A stable sort puts padding (0) first and keeps the real tokens in order.
    order = torch.sort(attention_mask, dim=-1, stable=True).indices
    ids = torch.gather(input_ids, 1, order)
    width = ids.shape[1]
    if width >= length:
        ids = ids[:, width - length :]
    else:
        padding = torch.full((ids.shape[0], length - width), pad_token_id, dtype=ids.dtype)
        ids = torch.cat([padding, ids], dim=1)
    mask = (torch.arange(length) >= (length - lengths)[:, None]).to(torch.long)
    return torch.where(mask.bool(), ids, pad_token_id), mask


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # [B, prompt + generated]: prompt as given, then new tokens
    # Per generated token, `[B, V]` fp32 each, as transformers' `GenerateDecoderOnlyOutput`:
    # the raw logits it was chosen from (with `output_logits`) and the processed scores
    # (with `output_scores`); empty unless asked for.
    raw_logits: tuple[torch.Tensor, ...] = ()
    scores: tuple[torch.Tensor, ...] = ()

    @property
    def logits(self) -> torch.Tensor:
        """The raw logits as one `[B, generated, V]` tensor (empty unless kept)."""
        return torch.stack(self.raw_logits, dim=1) if self.raw_logits else torch.empty(0)


def decode_loop(
    prefill: PrefillFn,
    decode: DecodeFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    pad_token_id: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    logits_processor: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    stopping_criteria: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    do_sample: bool = False,
    streamer=None,
    prompt_length: int | None = None,
    forced_tokens: torch.Tensor | None = None,
    output_logits: bool = False,
    output_scores: bool = False,
) -> GenerationOutput:
    """transformers' sampling/greedy loop (`GenerationMixin._sample`) over the two graphs.

    Per step: fp32 logits -> `logits_processor(ids, scores)` -> argmax (lowest id on ties)
    or `multinomial(softmax(scores))` with torch's global RNG, exactly as transformers
    draws; finished rows continue with `pad_token_id`; `stopping_criteria(ids, scores)`
    marks rows done (EOS, max length, stop strings); the loop ends when all are done.
    `prompt_length` pads prompts on the left to a prefill bucket; `forced_tokens` ([B, N])
    teacher-forces the continuation (the logits stay the model's). The raw logits of every
    step (`[B, V]` each: 1 MB per row in fp32) are kept only with `output_logits`, the
    processed scores only with `output_scores`; both make every step compute every logit.
    Otherwise greedy and top-k sampling steps whose processors and criteria allow it
    (`screened_selection`) compute only the logits their selection can pick: the same
    tokens (and the same draws), a fraction of the head.
    """
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    ids, mask = left_align(
        input_ids, attention_mask, pad_token_id, prompt_length or input_ids.shape[1]
    )
    positions = mask.sum(-1)
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    screen = (
        None
        if output_logits or output_scores or forced_tokens is not None
        else screened_selection(logits_processor, stopping_criteria, do_sample)
    )
    all_logits, all_scores = [], []
    next_logits = prefill(ids, mask)
    for step in range(max_new_tokens):
        logits, scores = _step_scores(next_logits, sequences, logits_processor, screen)
        if output_logits:
            all_logits.append(logits)
        if output_scores:
            all_scores.append(scores)
        if forced_tokens is not None:
            token = forced_tokens[:, step]
        elif do_sample:
            token = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            token = first_argmax(scores)
        token = torch.where(unfinished, token, pad_token_id)
        sequences = torch.cat([sequences, token[:, None]], dim=1)
        if streamer is not None:
            streamer.put(token.cpu())
        unfinished &= ~torch.isin(token, eos)
        if stopping_criteria is not None:
            unfinished &= ~stopping_criteria(sequences, scores)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        next_logits = decode(token[:, None], positions)
        positions = positions + 1
    if streamer is not None:
        streamer.end()
    return GenerationOutput(sequences, tuple(all_logits), tuple(all_scores))


def greedy_generate(
    prefill: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    prompt_length: int | None = None,
    forced_tokens: torch.Tensor | None = None,
) -> GenerationOutput:
    """Greedy decoding with EOS handling only, keeping logits: the path of tests and scripts.

    `prefill` and `decode` return full logits tensors (the eager decoder's methods).
    """
    return decode_loop(
        lambda *args: NextTokenLogits.of(prefill(*args)),
        lambda *args: NextTokenLogits.of(decode(*args)),
        input_ids,
        attention_mask,
        max_new_tokens,
        pad_token_id,
        eos_token_id,
        prompt_length=prompt_length,
        forced_tokens=forced_tokens,
        output_logits=True,
    )
