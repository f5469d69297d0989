"""Host-side token loop around the prefill and decode graphs.

The graphs only see static shapes; this module turns a user batch into them (left
alignment, bucket padding) and runs transformers' token loop over them: logits
processors, greedy or multinomial selection, EOS rows continuing with `pad_token_id`,
stopping criteria and streamers (selection: `selection.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .logits import NextTokenLogits
from .selection import first_argmax, screened_selection, step_scores

PrefillFn = Callable[[torch.Tensor, torch.Tensor], NextTokenLogits]
DecodeFn = Callable[[torch.Tensor, torch.Tensor], NextTokenLogits]


def left_align(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    pad_token_id: int,
    length: int,
    *per_token: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Move each row's real tokens to the right end of a `length`-wide batch.

    Accepts left-, right- or un-padded input, wider or narrower than `length` as long as
    every row's real tokens fit; the graphs require left padding with contiguous real
    tokens, which is what this returns: `(ids, mask, *per_token)`, where each `per_token`
    tensor (`[B, S, ...]`: image features, token types) moves with its tokens and is zero
    at padding.
    """
    attention_mask = attention_mask.to(torch.long)
    lengths = attention_mask.sum(-1)
    if int(lengths.max()) > length:
        raise ValueError(f"Cannot fit a prompt of {int(lengths.max())} tokens into {length}.")
    # A stable sort puts padding (0) first and keeps the real tokens in order.
    order = torch.sort(attention_mask, dim=-1, stable=True).indices
    mask = (torch.arange(length) >= (length - lengths)[:, None]).to(torch.long)
    ids = _aligned(input_ids, order, mask, pad_token_id)
    return ids, mask, *(_aligned(values, order, mask, 0) for values in per_token)


def _aligned(values: torch.Tensor, order: torch.Tensor, mask: torch.Tensor, fill) -> torch.Tensor:
    """`values` `[B, S, ...]` reordered by `order`, cut or left-padded to the width of
    `mask`, `fill` wherever `mask` is 0."""
    index = order.reshape(*order.shape, *[1] * (values.dim() - 2)).expand_as(values)
    values = torch.gather(values, 1, index)
    width, length = values.shape[1], mask.shape[1]
    if width >= length:
        values = values[:, width - length :]
    else:
        padding = values.new_full((values.shape[0], length - width, *values.shape[2:]), fill)
        values = torch.cat([padding, values], dim=1)
    keep = mask.bool().reshape(*mask.shape, *[1] * (values.dim() - 2))
    return torch.where(keep, values, fill)


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
    stopping_criteria: Callable[[torch.Tensor, tuple | None], torch.Tensor] | None = None,
    do_sample: bool = False,
    streamer=None,
    prompt_length: int | None = None,
    forced_tokens: torch.Tensor | None = None,
    output_logits: bool = False,
    output_scores: bool = False,
    prefill_inputs: tuple[torch.Tensor, ...] = (),
) -> GenerationOutput:
    """transformers' sampling/greedy loop (`GenerationMixin._sample`) over the two graphs.

    Per step: fp32 logits -> `logits_processor(ids, scores)` -> argmax (lowest id on ties)
    or `multinomial(softmax(scores))` with torch's global RNG, exactly as transformers
    draws; finished rows continue with `pad_token_id`; `stopping_criteria(ids, scores)`
    marks rows done (EOS, max length, stop strings; `scores` as transformers passes it:
    every step's scores so far with `output_scores`, else None); the loop ends when all
    are done.
    `prompt_length` pads prompts on the left to a prefill bucket; `forced_tokens` ([B, N])
    teacher-forces the continuation (the logits stay the model's). The raw logits of every
    step (`[B, V]` each: 1 MB per row in fp32) are kept only with `output_logits`, the
    processed scores only with `output_scores`; both make every step compute every logit.
    Otherwise greedy and top-k sampling steps whose processors and criteria allow it
    (`screened_selection`) compute only the logits their selection can pick: the same
    tokens (and the same draws), a fraction of the head. `prefill_inputs` (`[B, S, ...]`
    each: image features, token types) follow their tokens into the prefill call.
    """
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    ids, mask, *aligned = left_align(
        input_ids,
        attention_mask,
        pad_token_id,
        prompt_length or input_ids.shape[1],
        *prefill_inputs,
    )
    positions = mask.sum(-1)
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    screen = (
        None
        if output_logits or output_scores or forced_tokens is not None
        else screened_selection(logits_processor, do_sample)
    )
    all_logits, all_scores = [], []
    next_logits = prefill(ids, mask, *aligned)
    for step in range(max_new_tokens):
        logits, scores = step_scores(next_logits, sequences, logits_processor, screen)
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
            # What transformers' loop passes: every step's scores when it keeps them, else None.
            kept = tuple(all_scores) if output_scores else None
            unfinished &= ~stopping_criteria(sequences, kept)
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
