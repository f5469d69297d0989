"""Static KV caches and the slot arithmetic that makes them exact.

Every cache is a ring of `length` slots per row: the token at position `p` (its index
among the row's real tokens, padding excluded) lives in slot `p % length`.
- Full-attention layers get `length = sequence_length`, so they never wrap.
- Sliding layers get `length = min(sliding_window, sequence_length)`: after writing
  position `p` the ring holds positions `p - W + 1 .. p`, exactly the keys a sliding
  query may see (`q - k < W`), so no window mask is needed in decode.
In both cases slot `s` holds a real, current token iff `s <= p`, so one mask rule serves
both layer types. Left padding never enters the cache, so the window counts real tokens
exactly as transformers' slot-space mask does for a left-padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KVCache(nn.Module):
    """One layer's K and V caches, `[batch, kv_heads, length, head_dim]`, updated in place.

    The buffers are not part of the state dict: weights stay separable from graph state.
    """

    def __init__(self, batch_size: int, kv_heads: int, length: int, head_dim: int, dtype):
        super().__init__()
        shape = (batch_size, kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def fill(
        self, k: torch.Tensor, v: torch.Tensor, source_index: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Prefill: write cache rows `slots` `[B]` from their prompts' K/V `[B, Hkv, S, D]`,
        leaving every other row as it is (another request's, in a batch being decoded).

        `source_index[b, s]` is the prompt index whose K/V belongs in slot `s` (see
        `fill_index`); slots without a real token receive clamped copies that the mask
        hides until decode overwrites them.
        """
        index = source_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k.index_copy_(0, slots, torch.gather(k, 2, index))
        self.v.index_copy_(0, slots, torch.gather(v, 2, index))

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Decode: write one token per row `[B, Hkv, 1, D]` at slot `position % length`.

        Returns the caches to attend over. Only B slots are written: the cost does not
        grow with the cache length. `index_put_`, not `scatter_`: Inductor writes an
        `index_put` into the cache buffer itself, but computes a `scatter` into a copy of
        the whole cache that is then copied back (kernel profile of the 270M at batch 4,
        fp32: about 50 of a ~130 ms decode step went to those copies).
        """
        rows = torch.arange(k.shape[0], device=k.device)
        slot = positions % self.length
        self.k[rows, :, slot] = k[:, :, 0]
        self.v[rows, :, slot] = v[:, :, 0]
        return self.k, self.v


def fill_index(
    lengths: torch.Tensor, prompt_len: int, cache_len: int, left_padded: bool = True
) -> torch.Tensor:
    """For each row and cache slot, the index in the padded prompt that fills it.

    Slot `s` receives the latest real position `p <= lengths - 1` with `p % cache_len == s`;
    a left-padded row's position `p` sits at prompt index `p + (prompt_len - lengths)`, a
    right-padded row's at `p`.
    """
    last = (lengths - 1)[:, None]
    slots = torch.arange(cache_len, device=lengths.device)
    index = last - torch.remainder(last - slots, cache_len)
    if left_padded:
        index = index + (prompt_len - lengths)[:, None]
    return index.clamp(0, prompt_len - 1)


def decode_mask(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """`[B, 1, 1, L]` mask: slot `s` is attendable iff it holds a real token, i.e. `s <= p`."""
    slots = torch.arange(cache_len, device=positions.device)
    return (slots <= positions[:, None])[:, None, None, :]


def filled_slots(positions: torch.Tensor, cache_len: int) -> torch.Tensor:
    """`[B]`: how many leading slots `decode_mask` lets each row see, `min(p + 1, L)`."""
    return (positions + 1).clamp(max=cache_len)


def image_groups(token_type_ids: torch.Tensor) -> torch.Tensor:
    """`[B, S]`: each token's image number, -1 for text.

    An image is a run of consecutive `token_type_ids == 1`, numbered in order, as
    transformers' `Gemma3Model.forward` groups them (`image_group_ids`).
    """
    is_image = token_type_ids == 1
    starts = is_image & ~F.pad(is_image, (1, 0), value=False)[:, :-1]
    return torch.where(is_image, starts.long().cumsum(-1) - 1, -1)


def image_blocks(token_type_ids: torch.Tensor) -> torch.Tensor:
    """`[B, S, S]`: whether query `i` and key `j` are image tokens of the same image."""
    group = image_groups(token_type_ids)
    return (group[:, :, None] == group[:, None, :]) & (group[:, :, None] >= 0)


def prefill_mask(
    attention_mask: torch.Tensor, window: int | None, token_type_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """`[B, 1, S, S]` causal mask over a left-padded prompt, with an optional sliding window,
    opened both ways within each image's tokens (`token_type_ids`).

    Query `i` sees key `j` iff key `j` is a real token and either `j <= i` and (sliding)
    `i - j < W`, or both are tokens of the same image: transformers' rule, whose
    `token_type_ids_mask_function` is or-ed into the causal (and window) mask of both layer
    types before padding is masked. With left padding a row's real tokens are contiguous,
    so index distance equals position distance.
    """
    prompt_len = attention_mask.shape[1]
    idx = torch.arange(prompt_len, device=attention_mask.device)
    distance = idx[:, None] - idx[None, :]
    allowed = distance >= 0
    if window is not None:
        allowed = allowed & (distance < window)
    allowed = allowed[None]
    if token_type_ids is not None:
        allowed = allowed | image_blocks(token_type_ids)
    return (allowed & attention_mask.bool()[:, None, :])[:, None]
