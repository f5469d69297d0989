"""Continuous batching: requests own cache slots, join between decode steps, leave at once.

Each request is prefilled alone into a free slot of the compiled batch (`Gemma3Runtime`
prefills per row), then decoded with every other active request in one step of the
compiled decode program; the moment it finishes (EOS, its token budget, a stopping
criterion, the end of the compiled sequence, or a cancel) its slot is free for the next.

Per request, its own transformers logits processors and stopping criteria, greedy or
multinomial selection with its own `torch.Generator`: the selection `decode_loop` makes
for a `generate()` row. Since a row's logits do not depend on the other rows (per-row
prefill, batch-invariant products), a greedy request returns the same tokens alone or in
any traffic, and a seeded one the same draws.

Synchronous and single-threaded on purpose: the caller (a server's engine thread) calls
`step()` in a loop and routes the events it returns.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .engine import Gemma3Runtime
from .logits import NextTokenLogits
from .selection import ScreenedSelection, first_argmax, screened_selection, step_scores

# A step admits at most this many waiting requests while others are decoding: a prefill
# stalls every active request's next token, so joining is spread over steps.
DEFAULT_PREFILLS_PER_STEP = 1


@dataclass
class Sampling:
    """How one request picks and stops: transformers' objects, as `generate()` builds them."""

    max_new_tokens: int
    do_sample: bool = False
    logits_processor: Callable | None = None  # a `LogitsProcessorList`
    stopping_criteria: Callable | None = None  # a `StoppingCriteriaList`
    eos_token_ids: Sequence[int] = ()
    generator: torch.Generator | None = None  # the request's draws (sampling)


@dataclass(eq=False)
class SlotRequest:
    """One request: its prompt, its settings, and what it has produced so far."""

    prompt_ids: Sequence[int]
    sampling: Sampling
    tokens: list[int] = field(default_factory=list)
    slot: int | None = None
    finish_reason: str | None = None  # "stop", "length" or "cancelled" once finished
    cancelled: bool = False

    def __post_init__(self):
        self.sequence = torch.tensor([list(self.prompt_ids)], dtype=torch.long)
        self.screen = screened_selection(self.sampling.logits_processor, self.sampling.do_sample)


@dataclass(frozen=True)
class TokenEvent:
    """A request's new token, and its finish reason if it was the last (token None when a
    request ends without one: cancelled, or refused by the runtime)."""

    request: SlotRequest
    token: int | None
    finish_reason: str | None = None


class ContinuousBatcher:
    """Requests in, token events out, over one runtime's `batch_size` cache slots."""

    def __init__(self, runtime: Gemma3Runtime, prefills_per_step: int = DEFAULT_PREFILLS_PER_STEP):
        self.runtime = runtime
        self.prefills_per_step = prefills_per_step
        self.waiting: collections.deque[SlotRequest] = collections.deque()
        self.active: dict[int, SlotRequest] = {}

    @property
    def free_slots(self) -> list[int]:
        return [slot for slot in range(self.runtime.batch_size) if slot not in self.active]

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.active

    def submit(self, request: SlotRequest) -> None:
        """Queue a request; it is prefilled at a coming step, when a slot is free."""
        room = self.runtime.sequence_length - len(request.prompt_ids)
        if not request.prompt_ids or room < 1:
            raise ValueError(
                f"A prompt of {len(request.prompt_ids)} tokens leaves no room to generate in "
                f"the compiled sequence_length={self.runtime.sequence_length}."
            )
        self.runtime.bucket_for(len(request.prompt_ids))  # refuses a prompt past every bucket
        self.waiting.append(request)

    def step(self) -> list[TokenEvent]:
        """Drop cancelled requests, admit waiting ones into free slots (a prefill each: their
        first token), then decode one token for every other active request."""
        events = self._drop_cancelled()
        decoding = sorted(self.active)
        admitted = self._admit(limit=self.prefills_per_step if decoding else None)
        if admitted:
            events += self._prefill(admitted)
        if decoding:
            events += self._decode([self.active[slot] for slot in decoding])
        return events

    def _drop_cancelled(self) -> list[TokenEvent]:
        events = []
        for request in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(request)
            events.append(self._finish(request, None, "cancelled"))
        for request in [r for r in self.active.values() if r.cancelled]:
            events.append(self._finish(request, None, "cancelled"))
        return events

    def _admit(self, limit: int | None) -> list[SlotRequest]:
        admitted = []
        for slot in self.free_slots[:limit]:
            if not self.waiting:
                break
            request = self.waiting.popleft()
            request.slot = slot
            self.active[slot] = request
            admitted.append(request)
        return admitted

    def _prefill(self, requests: list[SlotRequest]) -> list[TokenEvent]:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.runtime.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = request.sequence[0]
            mask[row, width - len(request.prompt_ids) :] = 1
        logits = self.runtime.prefill(ids, mask, [r.slot for r in requests])
        return self._advance(requests, logits)

    def _decode(self, requests: list[SlotRequest]) -> list[TokenEvent]:
        ids = torch.tensor([r.tokens[-1] for r in requests])
        positions = torch.tensor([r.sequence.shape[1] - 1 for r in requests])
        logits = self.runtime.decode(ids, positions, [r.slot for r in requests])
        return self._advance(requests, logits)

    def _advance(self, requests: list[SlotRequest], logits: NextTokenLogits) -> list[TokenEvent]:
        tokens = select_tokens(logits, requests)
        return [self._append(r, token) for r, token in zip(requests, tokens, strict=True)]

    def _append(self, request: SlotRequest, token: int) -> TokenEvent:
        request.tokens.append(token)
        request.sequence = torch.cat([request.sequence, torch.tensor([[token]])], dim=1)
        sampling = request.sampling
        reason = None
        if token in sampling.eos_token_ids:
            reason = "stop"
        elif sampling.stopping_criteria is not None and bool(
            sampling.stopping_criteria(request.sequence, None).any()
        ):
            # transformers' max-length criterion is a budget, the others are stops.
            reason = "length" if len(request.tokens) >= sampling.max_new_tokens else "stop"
        elif len(request.tokens) >= sampling.max_new_tokens:
            reason = "length"
        elif request.sequence.shape[1] >= self.runtime.sequence_length:
            reason = "length"
        if reason is None:
            return TokenEvent(request, token)
        return self._finish(request, token, reason)

    def _finish(self, request: SlotRequest, token: int | None, reason: str) -> TokenEvent:
        request.finish_reason = reason
        if request.slot is not None:
            self.active.pop(request.slot, None)
        return TokenEvent(request, token, reason)

    def fail_all(self, reason: str = "cancelled") -> list[TokenEvent]:
        """Finish every waiting and active request without a token (shutdown)."""
        events = [self._finish(r, None, reason) for r in self.waiting]
        self.waiting.clear()
        events += [self._finish(r, None, reason) for r in list(self.active.values())]
        return events


def select_tokens(logits: NextTokenLogits, requests: list[SlotRequest]) -> list[int]:
    """Each request's next token from its row of `logits`, by its own processors.

    Where every row can select from screened logits, one screen at the largest k serves
    all: a row needing fewer finds its candidates among them, with exact logits (see
    `ScreenedSelection`). Otherwise every row gets every logit, as `generate()` does.
    """
    screens = [r.screen for r in requests]
    shared_k = max(s.k for s in screens) if all(s is not None for s in screens) else None
    tokens = []
    for row, request in enumerate(requests):
        screen = screens[row] if shared_k is not None else None
        if screen is not None:
            screen = ScreenedSelection(shared_k, screen.before, screen.after)
        sampling = request.sampling
        _, scores = step_scores(
            _row(logits, row), request.sequence, sampling.logits_processor, screen
        )
        if sampling.do_sample:
            probs = torch.softmax(scores, dim=-1)
            token = torch.multinomial(probs, num_samples=1, generator=sampling.generator)[0, 0]
        else:
            token = first_argmax(scores)[0]
        tokens.append(int(token))
    return tokens


def _row(logits: NextTokenLogits, row: int) -> NextTokenLogits:
    """Row `row` of a step's logits, computed (for every row at once) as far as it is read."""
    return NextTokenLogits(
        lambda: logits.full()[row : row + 1],
        lambda k: tuple(t[row : row + 1] for t in logits.near_top(k)),
    )
