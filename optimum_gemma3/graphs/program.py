"""The decoder's graphs as pure functions of `(weights, caches, *inputs)`: what backends compile.

Weights and caches are program inputs, not constants, so
- one compiled program serves every checkpoint of the same shape (fine-tunes included)
  and the artifact stores weights once, in safetensors, beside the programs;
- the prefill and decode programs share one set of cache tensors owned by the runtime,
  which both update in place.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .decoder import DecodeGraph, Gemma3Decoder, PrefillGraph, VerifyGraph
from .layers import SDPA_QUERY_BLOCK
from .vision import Gemma3VisionEncoder

PREFILL = "prefill"
DECODE = "decode"
VERIFY = "verify"
VISION = "vision"
GRAPHS = {PREFILL: PrefillGraph, DECODE: DecodeGraph, VERIFY: VerifyGraph}


class GraphProgram(nn.Module):
    """`PrefillGraph`, `DecodeGraph` or `VerifyGraph` with its weights and caches passed in
    as dicts.

    `with_head=False` ends the program at the final norm: the runtime then runs the head
    itself, as far as each step needs (see `Gemma3NeuronConfig.head_on_host`).
    """

    def __init__(self, decoder: Gemma3Decoder, kind: str, with_head: bool = True):
        super().__init__()
        graph = GRAPHS[kind](decoder, with_head)
        # Held outside the module tree: the decoder's own tensors must not be captured as
        # program constants. Only its fixed fp32 tables (RoPE, embed scale) are.
        self._graph = (graph,)
        self.kind = kind

    def forward(
        self,
        weights: dict[str, torch.Tensor],
        caches: dict[str, torch.Tensor],
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Prefill: `(input_ids [1, S], attention_mask [1, S], slot [1])` (S any whole
        number of blocks with an `sdpa_prefill` profile), then with images
        `(image_embeds [1, S, hidden], token_type_ids [1, S])`; decode:
        `(input_ids [B, 1], positions [B])`; verify: `(input_ids [B, T], positions [B, T])`."""
        state = {f"decoder.{name}": tensor for name, tensor in {**weights, **caches}.items()}
        return functional_call(self._graph[0], state, inputs)


class VisionProgram(nn.Module):
    """`Gemma3VisionEncoder` with its weights passed in as a dict: one image's pixels
    `[1, 3, H, W]` (fp32, as processors give them) to its features `[1, T, hidden]`."""

    def __init__(self, encoder: Gemma3VisionEncoder):
        super().__init__()
        self._encoder = (encoder,)  # outside the module tree, as in `GraphProgram`
        self.kind = VISION

    def forward(self, weights: dict[str, torch.Tensor], pixel_values: torch.Tensor):
        return functional_call(self._encoder[0], weights, (pixel_values,))


def canonical(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dict sorted by name: the order every program receives its weights and caches in.

    A compiled program flattens its dict inputs by position, so a caller must pass the
    same key order as at export; sorting on both sides makes that order independent of
    where the tensors come from (module order at export, file order at load).
    """
    return dict(sorted(tensors.items()))


def cache_tensors(decoder: Gemma3Decoder) -> dict[str, torch.Tensor]:
    """The decoder's KV cache buffers by name (the `caches` input of every program)."""
    return canonical({name: buf for name, buf in decoder.named_buffers() if ".cache." in name})


def weight_tensors(decoder: Gemma3Decoder) -> dict[str, torch.Tensor]:
    """The decoder's parameters by state-dict name (the `weights` input of every program)."""
    return canonical(dict(decoder.named_parameters()))


def image_inputs(decoder: Gemma3Decoder, prompt_length: int) -> tuple:
    """A multimodal prefill's image inputs for a prompt without images: no features, no
    image tokens (also what a text-only prompt passes). Empty for a text-only decoder."""
    if decoder.image_tokens is None:
        return ()
    hidden = decoder.config.hidden_size
    return (
        torch.zeros(1, prompt_length, hidden, dtype=decoder.dtype),
        torch.zeros(1, prompt_length, dtype=torch.long),
    )


def example_inputs(decoder: Gemma3Decoder, kind: str, length: int | None = None) -> tuple:
    """Static-shape example inputs for tracing one program: a prefill bucket (`length`
    tokens), decode, or verify (`length` tokens per row)."""
    if kind == PREFILL:  # one prompt into one cache row (see `Gemma3Decoder.prefill`)
        ids = torch.zeros(1, length, dtype=torch.long)
        extra = (torch.ones_like(ids), torch.zeros(1, dtype=torch.long))
        extra += image_inputs(decoder, length)
    elif kind == VERIFY:
        ids = torch.zeros(decoder.batch_size, length, dtype=torch.long)
        extra = (torch.zeros_like(ids),)
    else:
        ids = torch.zeros(decoder.batch_size, 1, dtype=torch.long)
        extra = (torch.zeros(decoder.batch_size, dtype=torch.long),)
    return weight_tensors(decoder), cache_tensors(decoder), ids, *extra


def traced_inputs(decoder: Gemma3Decoder, kind: str, length: int) -> tuple:
    """A decoder program's example inputs and `torch.export`'s `dynamic_shapes` for them:
    static shapes (`length`: the prefill bucket or verify tokens), except the prefill of
    an `sdpa_prefill` decoder, which serves every whole number of `SDPA_QUERY_BLOCK`
    tokens up to `length`."""
    if kind != PREFILL or not decoder.ops.sdpa_prefill:
        return example_inputs(decoder, kind, length), None
    # The example is long enough that both parts of a sliding layer's attention (its
    # window's first blocks, and blocks past them) are traced non-empty: tracing takes a
    # part of size 0 or 1 in the example for a constant (see `layers._sliding_sdpa`).
    block = SDPA_QUERY_BLOCK
    example_length = (decoder.config.sliding_window // block + 2) * block
    example = example_inputs(decoder, kind, example_length)
    weights, caches, _ids, _mask, _slot, *image = example
    most = -(-max(length, example_length) // block)
    tokens = block * torch.export.Dim("prompt_blocks", min=1, max=most)
    per_token = ({1: tokens},) * len(image)
    dims = (
        dict.fromkeys(weights),
        dict.fromkeys(caches),
        ({1: tokens}, {1: tokens}, None, *per_token),
    )
    return example, dims


def vision_example_inputs(encoder: Gemma3VisionEncoder) -> tuple:
    """Example inputs for tracing the vision program: its weights and one image."""
    size = encoder.image_size
    pixels = torch.zeros(1, encoder.num_channels, size, size)
    return canonical(dict(encoder.named_parameters())), pixels
