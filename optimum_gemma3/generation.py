"""Host-side token loop around the prefill and decode graphs.

The graphs only see static shapes; this module turns a user batch into them (left
alignment, bucket padding) and runs greedy decoding with transformers' conventions:
rows that produced an EOS token continue with `pad_token_id`, and the loop stops when
every row has finished.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PrefillFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
DecodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    logits: torch.Tensor  # [B, generated, V]: the logits each new token was chosen from


def greedy_generate(
    prefill: PrefillFn,
    decode: DecodeFn,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int = 0,
    prompt_length: int | None = None,
    forced_tokens: torch.Tensor | None = None,
) -> GenerationOutput:
    """Greedy decoding (argmax, lowest id on ties) over the two graphs.

    `prompt_length` pads prompts on the left to a prefill bucket. `forced_tokens`
    ([B, N]) teacher-forces the continuation (the logits are still those of the model),
    which lets a bf16 comparison follow the reference tokens past an early tie.
    """
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    ids, mask = left_align(
        input_ids, attention_mask, pad_token_id, prompt_length or input_ids.shape[1]
    )
    positions = mask.sum(-1)
    logits = prefill(ids, mask)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool)
    new_tokens, all_logits = [], []
    for step in range(max_new_tokens):
        all_logits.append(logits.float())
        token = logits.argmax(-1) if forced_tokens is None else forced_tokens[:, step]
        token = torch.where(finished, pad_token_id, token)
        new_tokens.append(token)
        finished |= torch.isin(token, eos)
        if finished.all() or step == max_new_tokens - 1:
            break
        logits = decode(token[:, None], positions)
        positions = positions + 1
    generated = torch.stack(new_tokens, dim=1) if new_tokens else input_ids[:, :0]
    return GenerationOutput(
        sequences=torch.cat([input_ids, generated], dim=1),
        logits=torch.stack(all_logits, dim=1) if all_logits else torch.empty(0),
    )
