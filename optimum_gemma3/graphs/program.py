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

from .decoder import DecodeGraph, Gemma3Decoder, LayerGraph, PrefillGraph, VerifyGraph
from .layers import SDPA_QUERY_BLOCK
from .vision import Gemma3VisionEncoder

PREFILL = "prefill"
DECODE = "decode"
VERIFY = "verify"
# The self-draft's decode pass (`graphs.draft`): per-layer programs only.
DRAFT = "draft"
VISION = "vision"
GRAPHS = {PREFILL: PrefillGraph, DECODE: DecodeGraph, VERIFY: VerifyGraph}
# The part of a prefill that a per-layer program runs beside the layer types': the last
# layer, for the last token only, with the final norm.
LAST = "last"
FINAL_NORM_PREFIX = "norm."


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


class LayerProgram(nn.Module):
    """One layer of a prefill, decode or verify pass as a program, called for every layer
    of its part (`layer_parts`: a layer type, or a prefill's LAST; see `LayerGraph`). Its
    weights and caches are one layer's, named within the layer (`layer_state`), so the
    runtime passes each layer's own.

    Compiling one layer per type instead of the whole stack is what makes an export quick:
    Inductor's work and the program's code grow with the number of layers in a graph.
    """

    def __init__(self, decoder: Gemma3Decoder, kind: str, part: str):
        super().__init__()
        self.index = layer_parts(decoder.config, kind)[part]
        graph = LayerGraph(decoder, self.index, kind == PREFILL)
        self._graph = (graph,)  # outside the module tree, as in `GraphProgram`

    def forward(
        self,
        weights: dict[str, torch.Tensor],
        caches: dict[str, torch.Tensor],
        *inputs: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states `[B, S, hidden]` through the layer, then prefill's
        `(attention_mask [1, S], slot [1])` and with images `token_type_ids [1, S]`, or
        decode's and verify's `(positions [B, T])`."""
        layer = f"decoder.layers.{self.index}."
        state = {
            f"decoder.{name}" if name.startswith(FINAL_NORM_PREFIX) else layer + name: tensor
            for name, tensor in {**weights, **caches}.items()
        }
        return functional_call(self._graph[0], state, inputs)


def layer_parts(config, kind: str) -> dict[str, int]:
    """The per-layer programs of pass `kind` of a decoder with text config `config`, each
    with the layer it is traced on (the first it runs): one per layer type, and for a
    prefill LAST, the last layer's own (it computes the last token only)."""
    parts = {}
    for index in range(config.num_hidden_layers):
        parts.setdefault(layer_part(config, kind, index), index)
    return parts


def layer_part(config, kind: str, index: int) -> str:
    """Which per-layer program of pass `kind` runs layer `index`."""
    if kind == PREFILL and index == config.num_hidden_layers - 1:
        return LAST
    return config.layer_types[index]


def layer_state(tensors: dict[str, torch.Tensor], index: int, last: bool) -> dict:
    """Layer `index`'s share of a decoder's weights or caches (`tensors`, by name), named
    within the layer, with the final norm's weight for the LAST program; in canonical order.
    """
    prefix = f"layers.{index}."
    state = {n.removeprefix(prefix): t for n, t in tensors.items() if n.startswith(prefix)}
    if last:
        state |= {n: t for n, t in tensors.items() if n.startswith(FINAL_NORM_PREFIX)}
    return canonical(state)


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


def pass_inputs(decoder: Gemma3Decoder, kind: str, length: int) -> tuple:
    """Zeros shaped like a pass's inputs: a prefill of `length` tokens (ids, mask, slot and
    the image inputs), decode (and the self-draft's), or verify (`length` tokens per row)."""
    if kind == PREFILL:  # one prompt into one cache row (see `Gemma3Decoder.prefill`)
        ids = torch.zeros(1, length, dtype=torch.long)
        return (
            ids,
            torch.ones_like(ids),
            torch.zeros(1, dtype=torch.long),
            *image_inputs(decoder, length),
        )
    if kind == VERIFY:
        ids = torch.zeros(decoder.batch_size, length, dtype=torch.long)
        return ids, torch.zeros_like(ids)
    ids = torch.zeros(decoder.batch_size, 1, dtype=torch.long)
    return ids, torch.zeros(decoder.batch_size, dtype=torch.long)


def example_inputs(
    decoder: Gemma3Decoder, kind: str, length: int | None = None, part: str | None = None
) -> tuple:
    """Static-shape example inputs for tracing one program: a prefill bucket (`length`
    tokens), decode, or verify (`length` tokens per row); of the whole pass, or of its
    per-layer program `part`."""
    weights, caches = weight_tensors(decoder), cache_tensors(decoder)
    ids, *extra = pass_inputs(decoder, kind, length)
    if part is None:
        return weights, caches, ids, *extra
    index = layer_parts(decoder.config, kind)[part]
    last = part == LAST
    hidden = torch.zeros(*ids.shape, decoder.config.hidden_size, dtype=decoder.dtype)
    if kind == PREFILL:  # the mask, the slot, the token types with images
        mask, slot, *image = extra
        extra = [mask, slot, *image[1:]]
    else:  # the positions, one per token
        extra = [extra[0].reshape(ids.shape)]
    state = layer_state(weights, index, last), layer_state(caches, index, last)
    return *state, hidden, *extra


def traced_inputs(decoder: Gemma3Decoder, kind: str, length: int, part: str | None = None) -> tuple:
    """A decoder program's example inputs (see `example_inputs`) and `torch.export`'s
    `dynamic_shapes` for them: static shapes (`length`: the prefill bucket or verify
    tokens), except the prefill of an `sdpa_prefill` decoder, which serves every whole
    number of `SDPA_QUERY_BLOCK` tokens up to `length`."""
    if kind != PREFILL or not decoder.ops.sdpa_prefill:
        return example_inputs(decoder, kind, length, part), None
    # The example is long enough that both parts of a sliding layer's attention (its
    # window's first blocks, and blocks past them) are traced non-empty: tracing takes a
    # part of size 0 or 1 in the example for a constant (see `layers._sliding_sdpa`).
    block = SDPA_QUERY_BLOCK
    example_length = (decoder.config.sliding_window // block + 2) * block
    example = example_inputs(decoder, kind, example_length, part)
    weights, caches, *per_pass = example
    most = -(-max(length, example_length) // block)
    tokens = block * torch.export.Dim("prompt_blocks", min=1, max=most)
    # Every input of a prefill is per token (dim 1) but its slot, the third: (ids, mask,
    # slot, *image inputs) for the whole pass, (hidden, mask, slot, *token types) per layer.
    per_pass_dims = [None if i == 2 else {1: tokens} for i in range(len(per_pass))]
    dims = (dict.fromkeys(weights), dict.fromkeys(caches), tuple(per_pass_dims))
    return example, dims


def vision_example_inputs(encoder: Gemma3VisionEncoder) -> tuple:
    """Example inputs for tracing the vision program: its weights and one image."""
    size = encoder.image_size
    pixels = torch.zeros(1, encoder.num_channels, size, size)
    return canonical(dict(encoder.named_parameters())), pixels
