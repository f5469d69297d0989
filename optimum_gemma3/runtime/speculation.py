"""Speculative greedy decoding: drafted tokens checked by the verify program, exactly.

Each round, a draft source guesses up to `k` next tokens per row; the verify program runs
the row's pending token and its drafts in one call (the weights read once for `k + 1`
positions), each position computing the numbers a one-token decode step computes there
(`Gemma3Decoder.decode`). The loop then selects each position's token as greedy decoding
would, with transformers' logits processors on the sequence so far: while a draft equals
the selected token the next position is valid too; the first that differs is replaced by
the selected token and the rest are dropped from the caches (`CacheRollback`). So the
tokens are plain greedy decoding's, bit for bit, whatever the drafts; good drafts only make
it faster. Draft sources: `PromptLookupDrafts` (n-grams of the prompt and output, through
transformers' `PromptLookupCandidateGenerator`) and `AssistantDrafts` (a smaller compiled
Gemma-3 decoding greedily, or the model's own int8 copy: `self_draft.SelfDraft`). Free
drafts are checked only where that is expected to pay (`CheckingPolicy`): a verify call
costs a few decode steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator

from .engine import Gemma3Runtime
from .logits import NextTokenLogits
from .loop import left_align
from .selection import (
    ID_MASKING_PROCESSORS,
    first_argmax,
    masked_token_ids,
    screened_selection,
    screened_top,
    step_scores,
)


@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor  # [B, prompt + generated]: prompt as given, then new tokens
    drafted: int = 0  # drafted tokens checked by the verify program
    accepted: int = 0  # of which equal to the selected token
    verify_calls: int = 0
    decode_calls: int = 0  # one-token steps (no drafts, or no room left for k positions)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class PromptLookupDrafts:
    """Drafts copied from the row's own tokens: what followed the latest earlier
    occurrence of its last n-gram (transformers' prompt lookup, `max_matching_ngram_size`
    down to 1). Free to compute; it pays off where the output repeats the input (editing
    code, summaries, extraction)."""

    free = True  # proposing costs no model call: `CheckingPolicy` decides whether to check

    def __init__(
        self, max_matching_ngram_size: int | None = None, eos_token_id: int | list | None = None
    ):
        self.max_matching_ngram_size = max_matching_ngram_size or 2
        # Drafts stop at an end-of-sequence token, as transformers' lookup stops them.
        eos = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or []
        self.eos_token_id = torch.tensor(eos, dtype=torch.long)

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Nothing to prepare: the drafts come from the tokens themselves."""

    def propose(
        self, tokens: Sequence[list[int]], positions: torch.Tensor, active: list[bool], k: int
    ) -> list[list[int]]:
        lookup = PromptLookupCandidateGenerator(
            eos_token_id=self.eos_token_id,
            num_output_tokens=k,
            max_matching_ngram_size=self.max_matching_ngram_size,
            max_length=max(map(len, tokens)) + k + 2,
        )
        drafts = []
        for row, is_active in zip(tokens, active, strict=True):
            if not is_active:
                drafts.append([])
                continue
            ids = torch.tensor([row])
            candidates, _ = lookup.get_candidates(ids)
            drafts.append(candidates[0, len(row) :].tolist())
        return drafts

    def keep(self, counts: torch.Tensor) -> None:
        """Nothing to roll back."""


class RoundEntries(Protocol):
    """A round's cache entries, saved before the draft decodes them (`save_positions`)."""

    def keep(self, counts: torch.Tensor) -> None:
        """Keep each row's first `counts` positions of the round; put back the rest."""


class DraftModel(Protocol):
    """What `AssistantDrafts` drives: another export's `Gemma3Runtime`, or the model's own
    int8 copy (`self_draft.SelfDraft`)."""

    # Whether its caches take the target's entries after each round: then the last draft
    # need not be decoded only to store its keys and values.
    takes_target_entries: bool

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        """Fill its caches with the prompts (rows 0..rows-1)."""

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> NextTokenLogits:
        """Logits of one token per row at `positions`, stored in its caches."""

    def save_positions(
        self, positions: torch.Tensor, width: int, slots: Sequence[int] | None = None
    ) -> RoundEntries:
        """The entries of `width` positions from each row's `positions`, to keep or put back."""


class AssistantDrafts:
    """Drafts from another compiled Gemma-3 sharing the tokenizer, decoding greedily in its
    own KV caches (a 270m drafting for a 1b, 4b, 12b or 27b, or a smaller export of the
    same model). Its caches follow the target's accepted tokens: it decodes the pending
    token and its `k` drafts (`k + 1` steps, the last only to store the last draft), then
    keeps the positions the target accepted and puts back the rest. An assistant whose
    caches take the target's entries after each round (`takes_target_entries`: the
    self-draft) skips that last step."""

    free = False  # its drafts cost decode steps of the assistant: always checked

    def __init__(self, assistant: DraftModel, pad_token_id: int):
        self.runtime = assistant
        self.pad_token_id = pad_token_id
        self._rollback = None

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.runtime.prefill(ids, mask)

    def propose(
        self, tokens: Sequence[list[int]], positions: torch.Tensor, active: list[bool], k: int
    ) -> list[list[int]]:
        rows = len(tokens)
        slots = torch.arange(rows)
        self._rollback = self.runtime.save_positions(positions, k + 1, slots)
        current = torch.tensor(
            [row[-1] if on else self.pad_token_id for row, on in zip(tokens, active, strict=True)]
        )
        steps = k if self.runtime.takes_target_entries else k + 1
        drafts = []
        for step in range(steps):
            step_logits = self.runtime.decode(current[:, None], positions + step)
            if step == k:  # it only stores the last draft's keys and values: no head
                break
            logits, _ = step_logits.near_top(1)
            current = first_argmax(logits.float())
            drafts.append(current)
        drafted = torch.stack(drafts, dim=1).tolist()
        return [row if on else [] for row, on in zip(drafted, active, strict=True)]

    def keep(self, counts: torch.Tensor) -> None:
        self._rollback.keep(counts)


class CheckingPolicy:
    """Whether checking a round's free drafts is expected to beat a one-token step.

    A verify call costs `ratio` decode steps (measured in this call: the means of both
    kinds of round, 2 until both are known) and yields `1 + a + a^2 + ... + a^n` tokens
    for `n` drafts accepted each with probability `a`. `a` is estimated from every draft
    the target has judged, including the first draft of rounds decoded without checking
    (is it the token the step chose?), so the estimate keeps learning either way. The
    choice changes the speed only: both kinds of round give greedy decoding's tokens.
    """

    def __init__(self):
        self.hits, self.tries = 1.0, 2.0  # a prior of 1/2
        self.seconds = {"verify": [0.0, 0], "decode": [0.0, 0]}

    def record(self, kind: str, seconds: float) -> None:
        self.seconds[kind][0] += seconds
        self.seconds[kind][1] += 1

    def observe(self, hits: int, tries: int) -> None:
        self.hits += hits
        self.tries += tries

    def worth_checking(self, lengths: list[int]) -> bool:
        (verify, n_verify), (decode, n_decode) = self.seconds["verify"], self.seconds["decode"]
        ratio = (verify / n_verify) / (decode / n_decode) if n_verify and n_decode else 2.0
        accept = self.hits / self.tries
        drafts = round(sum(lengths) / len(lengths))
        return sum(accept**i for i in range(drafts + 1)) >= ratio


@dataclass
class GreedySelection:
    """Greedy selection as `decode_loop` does it: transformers' processors on each row's
    own sequence, screened where they allow, the first largest score."""

    logits_processor: Callable | None

    def __post_init__(self):
        self.screen = screened_selection(self.logits_processor, do_sample=False)
        self.plain = self.screen is not None and not self.screen.before and not self.screen.after
        # Only processors that set known ids to -inf (min_new_tokens, suppress_tokens, ...):
        # a position's choice then depends on its sequence's length alone, so all the
        # positions of a verify call are chosen at once (`by_length`), not one by one.
        self.lengths_suffice = (
            self.screen is not None
            and not self.screen.after
            and all(type(p) in ID_MASKING_PROCESSORS for p in self.screen.before)
        )

    def __call__(self, step: NextTokenLogits, sequences: list[torch.Tensor]) -> list[int]:
        if self.plain:  # no processors: every row at once
            logits, _ = step.near_top(1)
            return first_argmax(logits.float()).tolist()
        chosen = []
        for row, sequence in enumerate(sequences):
            view = step.rows(torch.tensor([row]))
            _, scores = step_scores(view, sequence, self.logits_processor, self.screen)
            chosen.append(int(first_argmax(scores)[0]))
        return chosen

    def by_length(
        self, steps: Sequence[NextTokenLogits], lengths: list[list[int]]
    ) -> list[list[int]] | None:
        """Every step's choice per row (`lengths[j][row]`: the length of that row's
        sequence at step j), in one pass over all of them, where `lengths_suffice`: the
        scores `step_scores` makes (each processor's ids set to -inf), the first largest.
        None where masking left some row no exact candidate at or above its floor (then
        `step_scores`' fallback, every logit, decides: the caller selects step by step)."""
        near = [step.near_top(1) for step in steps]
        scores = torch.cat([logits for logits, _ in near]).float()  # a fresh tensor
        floor = torch.cat([floor for _, floor in near])
        rows, ids = [], []
        for row, length in enumerate(length for step in lengths for length in step):
            for processor in self.screen.before:
                masked = masked_token_ids(processor, length, scores.shape[-1])
                rows.append(torch.full_like(masked, row))
                ids.append(masked)
        if ids:
            scores[torch.cat(rows), torch.cat(ids)] = -torch.inf
        # Unmasked, a score is its logit (masking keeps every other score as it was).
        top = screened_top(scores, scores, floor, 1)
        return None if top is None else top.view(len(steps), -1).tolist()


def speculative_greedy(
    runtime: Gemma3Runtime,
    drafts,
    prefill: Callable[..., NextTokenLogits],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    num_drafts: int,
    pad_token_id: int = 0,
    eos_token_id: int | Sequence[int] | None = None,
    logits_processor: Callable | None = None,
    stopping_criteria: Callable | None = None,
    streamer=None,
    prefill_inputs: tuple[torch.Tensor, ...] = (),
) -> SpeculativeOutput:
    """Greedy decoding with drafts from `drafts` checked `num_drafts` at a time (at most
    the runtime's `speculation_length`): the tokens of `decode_loop(..., do_sample=False)`
    with the same processors, criteria and EOS handling, rows finishing on their own.

    Where a row has no room left for `k + 1` positions, or no row has drafts, the round is
    a one-token decode step: the same numbers, without the verify program's extra work.
    """
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    select = GreedySelection(logits_processor)
    rows, width = input_ids.shape
    k = min(num_drafts, runtime.speculation_length)
    checked = runtime.speculation_length + 1  # the verify program's tokens per row
    ids, mask, *aligned = left_align(
        input_ids, attention_mask, pad_token_id, width, *prefill_inputs
    )
    positions = mask.sum(-1)
    prompts = input_ids.tolist()
    # Each row's real tokens (no padding): what draft sources read.
    tokens = [row[len(row) - int(n) :] for row, n in zip(ids.tolist(), positions, strict=True)]
    generated: list[list[int]] = [[] for _ in range(rows)]
    active = [max_new_tokens > 0] * rows
    output = SpeculativeOutput(input_ids)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    def sequence(row: int, extra: Sequence[int] = ()) -> torch.Tensor:
        return torch.tensor([prompts[row] + generated[row] + list(extra)])

    def emit(row: int, token: int) -> None:
        generated[row].append(token)
        tokens[row].append(token)
        if streamer is not None:
            streamer.put(torch.tensor([token]))
        finished = token in eos or len(generated[row]) >= max_new_tokens
        if not finished and stopping_criteria is not None:
            finished = bool(stopping_criteria(sequence(row), None)[0])
        active[row] = not finished

    policy = CheckingPolicy()
    if any(active):
        first = select(prefill(ids, mask, *aligned), [sequence(r) for r in range(rows)])
        drafts.start(ids, mask)  # after the target's prefill: a self-draft copies its caches
        for row, token in enumerate(first):
            emit(row, token)
    while any(active):
        pending = torch.tensor(
            [g[-1] if on else pad_token_id for g, on in zip(generated, active, strict=True)]
        )
        room = bool((positions + checked <= runtime.sequence_length).all())
        proposed = drafts.propose(tokens, positions, active, k) if room and k else [[]] * rows
        proposed = [row[:k] for row in proposed]
        lengths = [len(row) for row, on in zip(proposed, active, strict=True) if on]
        check = any(lengths) and (not drafts.free or policy.worth_checking(lengths))
        start = time.perf_counter()
        if not check:
            output.decode_calls += 1
            chosen = select(
                runtime.decode(pending[:, None], positions), [sequence(r) for r in range(rows)]
            )
            policy.record("decode", time.perf_counter() - start)
            judged = [r for r in range(rows) if active[r] and proposed[r]]
            policy.observe(sum(proposed[r][0] == chosen[r] for r in judged), len(judged))
            for row, token in enumerate(chosen):
                if active[row]:
                    emit(row, token)
            positions = positions + 1
            if room and k:
                drafts.keep(torch.ones(rows, dtype=torch.long))
            continue
        output.verify_calls += 1
        output.drafted += sum(lengths)
        accepted = output.accepted
        padded = [
            [int(p), *row, *[pad_token_id] * (checked - 1 - len(row))]
            for p, row in zip(pending, proposed, strict=True)
        ]
        steps, rollback = runtime.verify(torch.tensor(padded), positions)
        kept = torch.ones(rows, dtype=torch.long)  # the pending token
        checking = list(active)
        at_once = None
        if select.lengths_suffice:
            done = [len(prompts[r]) + len(generated[r]) for r in range(rows)]
            at_once = select.by_length(steps, [[n + j for n in done] for j in range(len(steps))])
        for j, step in enumerate(steps):
            if not any(checking):
                break
            if at_once is not None:
                chosen = at_once[j]
            else:
                chosen = select(step, [sequence(r, proposed[r][:j]) for r in range(rows)])
            for row, token in enumerate(chosen):
                if not checking[row]:
                    continue
                hit = j < len(proposed[row]) and proposed[row][j] == token
                output.accepted += hit
                emit(row, token)
                checking[row] = hit and active[row]
                kept[row] += hit
        rollback.keep(kept)
        drafts.keep(kept)
        positions = positions + kept
        policy.record("verify", time.perf_counter() - start)
        policy.observe(output.accepted - accepted, sum(lengths))
    if streamer is not None:
        streamer.end()
    longest = max(map(len, generated))
    new = [g + [pad_token_id] * (longest - len(g)) for g in generated]
    output.sequences = torch.cat(
        [input_ids, torch.tensor(new, dtype=input_ids.dtype).reshape(rows, longest)], dim=1
    )
    return output
