"""The Gemma-3 text decoder as two static-shape graphs: prefill and decode.

One `Gemma3Decoder` owns the weights and the KV caches; `PrefillGraph` and `DecodeGraph`
are thin views of it with the signatures a compiler backend traces:

- prefill(input_ids [B, S], attention_mask [B, S]) -> logits [B, V] of each row's last
  token. Rows are left-padded, so the last real token is at index S - 1 for every row.
  The caches are filled as a side effect. A decoder built with `image_tokens` (a
  multimodal checkpoint's) also takes the image features at the image-token positions
  and `token_type_ids`, whose image blocks attend both ways (see `cache.prefill_mask`).
- decode(input_ids [B, 1], positions [B]) -> logits [B, V]. `positions` is the index of
  the new token among the row's real tokens (the prompt length on the first step).
- verify(input_ids [B, T], positions [B, T]) -> logits [B, T, V]: T consecutive tokens
  per row (speculative decoding's check of drafted tokens), each position computing the
  numbers a one-token decode step computes there.

Parameter names mirror transformers' `Gemma3TextModel`, so checkpoint loading is only
prefix handling (see `optimum_gemma3.weights`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Gemma3TextConfig

from .cache import KVCache, decode_mask, fill_index, filled_slots, image_groups, prefill_mask
from .config import FULL, LAYER_TYPES, SLIDING, ImageTokens, rope_frequencies, text_config
from .layers import (
    MLP,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    apply_rotary,
    blocked_prefill_attention,
    decode_attention,
    linear,
    output_linear,
    sdpa_prefill_attention,
)
from .ops import PLAIN, OpsProfile
from .parallel import RANK_NAME, TensorParallelLayout, all_reduce, gather_vocab


@dataclass
class LayerInputs:
    """What every layer of one type (sliding or full) needs for one graph call."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | tuple[torch.Tensor, ...] | None  # decode: one per new token
    positions: torch.Tensor | None = None  # decode: where to write the new tokens [B, T]
    filled: tuple[torch.Tensor, ...] = ()  # decode: per new token, the slots each row sees
    fill_index: torch.Tensor | None = None  # prefill: which prompt token fills each slot
    slots: torch.Tensor | None = None  # prefill: the cache row each prompt fills
    window: int | None = None  # prefill: the sliding window (None: full attention)
    image_reach: int = 0  # prefill: how far beyond causal range an image token may see
    groups: torch.Tensor | None = None  # sdpa prefill: each token's image, -1 for text
    last: torch.Tensor | None = None  # sdpa prefill: each row's last real token [B]


class Attention(nn.Module):
    """Gemma-3 attention with q/k norms before RoPE and its own KV cache.

    Head counts are attributes of the module, not re-read from the config, so a
    tensor-parallel build can give each rank a slice of the heads.
    """

    def __init__(
        self,
        config: Gemma3TextConfig,
        cache: KVCache,
        layout: TensorParallelLayout,
        ops: OpsProfile,
    ):
        super().__init__()
        self.ops = ops
        self.num_heads = layout.num_heads
        self.num_kv_heads = layout.num_kv_heads
        self.head_dim = config.head_dim
        # Gemma-3 scales scores by query_pre_attn_scalar**-0.5, not head_dim**-0.5 (27b: 168).
        self.scale = config.query_pre_attn_scalar**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=bias, ops=ops)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias, ops=ops)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias, ops=ops)
        self.o_proj = output_linear(
            self.num_heads * self.head_dim, hidden, bias, ops, row_parallel=layout.degree > 1
        )
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cache = cache

    def _heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        batch, seq = x.shape[:2]
        return x.view(batch, seq, num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self, x: torch.Tensor, inputs: LayerInputs, last_query_only: bool = False
    ) -> torch.Tensor:
        """Attention output for every token of `x`, or only its last (`last_query_only`).

        Keys and values always cover every token: they fill the cache.
        """
        queries, cos, sin, mask = x, inputs.cos, inputs.sin, inputs.mask
        if last_query_only:
            queries = last_tokens(x, inputs.last)
            cos, sin = last_tokens(cos, inputs.last, 2), last_tokens(sin, inputs.last, 2)
            mask = None if mask is None else mask[:, :, -1:]
        q = self.q_norm(self._heads(self.q_proj(queries), self.num_heads))
        k = self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads))
        v = self._heads(self.v_proj(x), self.num_kv_heads)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, inputs.cos, inputs.sin)
        if inputs.fill_index is not None:
            # Prefill starts from an empty cache: attend within the prompt, then store it.
            self.cache.fill(k, v, inputs.fill_index, inputs.slots)
            if self.ops.sdpa_prefill:
                out = sdpa_prefill_attention(
                    q,
                    k,
                    v,
                    self.scale,
                    inputs.window,
                    inputs.groups,
                    inputs.image_reach,
                    last=inputs.last if last_query_only else None,
                    ops=self.ops,
                )
            else:
                out = blocked_prefill_attention(
                    q, k, v, mask, self.scale, inputs.window, inputs.image_reach, ops=self.ops
                )
        else:
            out = self._decode_attention(q, k, v, inputs)
        batch, seq = queries.shape[:2]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))

    def _decode_attention(self, q, k, v, inputs: LayerInputs) -> torch.Tensor:
        """Each new token in turn writes its keys and values at its slot, then attends over
        the cache as a one-token decode step at its position does: with several tokens
        (verification), every one sees exactly the cache that step would see, computed
        by the same call, so its numbers are that step's."""
        outs = []
        for j, (mask, filled) in enumerate(zip(inputs.mask, inputs.filled, strict=True)):
            step = slice(j, j + 1)
            keys, values = self.cache.update(k[:, :, step], v[:, :, step], inputs.positions[:, j])
            outs.append(
                decode_attention(q[:, :, step], keys, values, mask, filled, self.scale, self.ops)
            )
        return torch.cat(outs, dim=2)


class DecoderLayer(nn.Module):
    """Pre- and post-norm around both attention and MLP: four norms per block."""

    def __init__(
        self,
        config: Gemma3TextConfig,
        layer_type: str,
        cache: KVCache,
        layout: TensorParallelLayout,
        ops: OpsProfile,
    ):
        super().__init__()
        self.layer_type = layer_type
        eps = config.rms_norm_eps
        self.self_attn = Attention(config, cache, layout, ops)
        self.mlp = MLP(
            config.hidden_size,
            layout.intermediate_size,
            config.hidden_activation,
            row_parallel=layout.degree > 1,
            ops=ops,
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(
        self, h: torch.Tensor, inputs: LayerInputs, last_token_only: bool = False
    ) -> torch.Tensor:
        """The block's output for every token of `h`, or only for its last one
        (`last_token_only`, which still fills the cache with every token's keys and values).
        """
        attended = self.self_attn(self.input_layernorm(h), inputs, last_token_only)
        if last_token_only:
            h = last_tokens(h, inputs.last)
        h = h + self.post_attention_layernorm(attended)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def _real_tokens_first(input_ids, attention_mask, *per_token):
    """The prompts (and their per-token inputs, where given) with each row's real tokens
    moved to the front in order, the padding after them: right padding, stably sorted."""
    order = torch.sort(attention_mask, dim=-1, descending=True, stable=True).indices

    def gathered(values):
        if values is None:
            return None
        index = order.view(*order.shape, *[1] * (values.dim() - 2)).expand_as(values)
        return values.gather(1, index)

    return gathered(input_ids), gathered(attention_mask), *map(gathered, per_token)


def last_tokens(x: torch.Tensor, last: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """`x`'s entries at each row's last real token along `dim`, keeping that dim (size 1):
    the last index for left-padded prompts (`last` None), else `last` `[B]`."""
    if last is None:
        return x.narrow(dim, x.shape[dim] - 1, 1)
    index = last.view(-1, *[1] * (x.dim() - 1))
    return x.gather(dim, index.expand(*x.shape[:dim], 1, *x.shape[dim + 1 :]))


def head_weight_name(config) -> str:
    """The weight name of the vocabulary head: the unscaled embedding table when tied."""
    return "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"


class Gemma3Decoder(nn.Module):
    """Weights, caches and the two forward passes of a Gemma-3 text decoder.

    Built for a fixed `batch_size` and `sequence_length` (the cache length of full layers);
    prefill accepts any prompt length up to `sequence_length`, so each bucket is the same
    module traced with a different input shape. With `tp_degree > 1` it is one rank's
    slice of the model (see `parallel`): the same graph on every rank, its rank a weight.
    `ops` says which forms of products, attention and gelu its graphs use (see `ops`).
    `image_tokens` (a multimodal checkpoint's) gives prefill its image inputs.
    """

    def __init__(
        self,
        config,
        batch_size: int,
        sequence_length: int,
        dtype: torch.dtype = torch.float32,
        tp_degree: int = 1,
        ops: OpsProfile = PLAIN,
        image_tokens: ImageTokens | None = None,
    ):
        super().__init__()
        config = text_config(config)
        self.config = config
        self.ops = ops
        self.image_tokens = image_tokens
        self.layout = layout = TensorParallelLayout.for_config(config, tp_degree)
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.dtype = dtype
        self.window = {SLIDING: config.sliding_window, FULL: None}
        self.cache_len = {
            SLIDING: min(config.sliding_window, sequence_length),
            FULL: sequence_length,
        }

        self.embed_tokens = nn.Embedding(layout.vocab_size, config.hidden_size)
        layers = []
        for layer_type in config.layer_types[: config.num_hidden_layers]:
            if layer_type not in LAYER_TYPES:
                raise ValueError(f"Unknown layer type {layer_type!r} in config.layer_types.")
            cache = KVCache(
                batch_size,
                layout.num_kv_heads,
                self.cache_len[layer_type],
                config.head_dim,
                dtype,
            )
            layers.append(DecoderLayer(config, layer_type, cache, layout, ops))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, layout.vocab_size, bias=False, ops=ops)
        )
        if layout.degree > 1:
            self.register_parameter(
                RANK_NAME, nn.Parameter(torch.zeros(1, dtype=torch.int32), requires_grad=False)
            )
        self.rotary = nn.ModuleDict({kind: RotaryEmbedding() for kind in LAYER_TYPES})
        self.register_buffer("embed_scale", torch.empty(()), persistent=False)
        self.init_constants()
        # Only parameters take the model dtype; embed_scale and inv_freq stay fp32.
        for param in self.parameters():
            if param.is_floating_point():
                param.data = param.data.to(dtype)

    @classmethod
    def skeleton(
        cls,
        config,
        batch_size: int,
        sequence_length: int,
        dtype: torch.dtype,
        tp_degree: int = 1,
        ops: OpsProfile = PLAIN,
        image_tokens: ImageTokens | None = None,
    ):
        """A decoder with uninitialized weights and caches, built without initialization cost.

        Enough to trace the graphs (their weights and caches are program inputs) and to
        list cache shapes; the fixed fp32 tables are computed for real.
        """
        with torch.device("meta"):
            decoder = cls(config, batch_size, sequence_length, dtype, tp_degree, ops, image_tokens)
        decoder.to_empty(device="cpu")
        decoder.init_constants()
        return decoder

    def init_constants(self) -> None:
        """Compute the fixed fp32 tables, on the CPU whatever the default device."""
        with torch.device("cpu"):
            # sqrt(hidden) held in fp32 and rounded to the weight dtype before the multiply,
            # as transformers does (bf16 1b: 34.0, not 33.94).
            self.embed_scale = torch.tensor(self.config.hidden_size**0.5)
            for kind in LAYER_TYPES:
                inv_freq, attention_scaling = rope_frequencies(self.config, kind)
                self.rotary[kind].inv_freq = inv_freq
                self.rotary[kind].attention_scaling = attention_scaling

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, scaled by sqrt(hidden) as Gemma does."""
        weight = self.embed_tokens.weight
        if self.layout.degree == 1:
            rows = self.embed_tokens(input_ids)
        else:
            # Vocab-parallel: this rank's ids only; the all-reduce adds exact zeros elsewhere.
            local = input_ids - getattr(self, RANK_NAME) * self.layout.vocab_size
            owned = (local >= 0) & (local < self.layout.vocab_size)
            rows = self.embed_tokens(torch.where(owned, local, 0)) * owned[..., None]
            rows = all_reduce(rows)
        return rows * self.embed_scale.to(weight.dtype)

    def _embed_with_images(
        self, input_ids: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """Token embeddings, with `image_embeds` `[B, S, hidden]` (unscaled projector
        outputs) in place of every image token's, as transformers' `masked_scatter`; the
        image token's own id is looked up as pad (0) in case it lies outside the vocabulary.
        """
        is_image = input_ids == self.image_tokens.token_id
        text = self.embed(torch.where(is_image, 0, input_ids))
        return torch.where(is_image[..., None], image_embeds.to(text.dtype), text)

    def head_weight(self) -> torch.Tensor:
        """The vocabulary head's weight (`head_weight_name`)."""
        return self.get_parameter(head_weight_name(self.config))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of final-normed hidden states (one token per row)."""
        if self.layout.degree == 1:
            return linear(hidden, self.head_weight(), self.ops)
        # F.linear: the gathered tensor must not be a custom op's output (RowParallelLinear).
        logits = torch.nn.functional.linear(hidden, self.head_weight())
        return gather_vocab(logits, getattr(self, RANK_NAME), self.config.vocab_size)

    def final_norm(self, h: torch.Tensor, every_token: bool = False) -> torch.Tensor:
        """The final norm of each row's last token `[B, hidden]`, or of every token."""
        return self.norm(h if every_token else h[:, -1])

    def _output(self, h: torch.Tensor, with_head: bool) -> torch.Tensor:
        """Each row's last token, final-normed, then through the head `with_head`."""
        hidden = self.final_norm(h)
        return self.head(hidden) if with_head else hidden

    def run_layer(
        self, index: int, h: torch.Tensor, inputs: dict[str, LayerInputs]
    ) -> torch.Tensor:
        """Layer `index` on hidden states `h` (every token kept)."""
        layer = self.layers[index]
        return layer(h, inputs[layer.layer_type])

    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slots: torch.Tensor | None = None,
        with_head: bool = True,
        image_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run left-padded prompts `[B, S]`, fill their cache rows `slots` (default: rows
        0..B-1) and return last-token logits (or, without the head, the final-normed
        hidden states the head takes). Other cache rows are left as they are.

        With images (a decoder built with `image_tokens`): `image_embeds` `[B, S, hidden]`
        holds each image token's feature at its position (anything elsewhere), and
        `token_type_ids` `[B, S]` marks the tokens whose image blocks attend both ways
        (all zeros: causal only, as transformers without token types).

        The compiled prefill takes one prompt (B = 1) and its slot: a row's numbers then
        depend on its own prompt only, never on the other rows or their lengths.

        A decoder whose ops profile has `sdpa_prefill` moves the padding to the right
        first (an identity for prompts that come so) and traces one graph for every
        length (see `layers.sdpa_prefill_attention`); its programs take prompts padded to
        a whole number of `SDPA_QUERY_BLOCK` tokens.

        The stages (`embed_prompt`, then per layer `prefill_inputs` and `run_layer`, then
        `prefill_output`) are also what per-layer programs run one at a time.
        """
        if slots is None:
            slots = torch.arange(input_ids.shape[0], device=input_ids.device)
        h, attention_mask, token_type_ids = self.embed_prompt(
            input_ids, attention_mask, image_embeds, token_type_ids
        )
        inputs = self.prefill_inputs(attention_mask, slots, token_type_ids)
        for index in range(len(self.layers) - 1):
            h = self.run_layer(index, h, inputs)
        return self.prefill_output(h, inputs, with_head)

    def embed_prompt(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The prompts' embeddings, with their attention mask and token types: padding
        moved to the right first where the ops profile has `sdpa_prefill`."""
        if self.ops.sdpa_prefill:
            input_ids, attention_mask, image_embeds, token_type_ids = _real_tokens_first(
                input_ids, attention_mask, image_embeds, token_type_ids
            )
        if image_embeds is None:
            h = self.embed(input_ids)
        else:
            h = self._embed_with_images(input_ids, image_embeds)
        return h, attention_mask, token_type_ids

    def prefill_inputs(
        self,
        attention_mask: torch.Tensor,
        slots: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> dict[str, LayerInputs]:
        """Each layer type's inputs for prompts with `attention_mask` (as `embed_prompt`
        returns it) going into cache rows `slots`."""
        sdpa = self.ops.sdpa_prefill
        prompt_len = attention_mask.shape[1]
        if sdpa:
            positions = torch.arange(prompt_len, device=attention_mask.device)
            positions = positions.expand_as(attention_mask)
        else:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        lengths = attention_mask.sum(-1)
        reach = 0 if token_type_ids is None else self.image_tokens.per_image - 1
        groups = None if token_type_ids is None or not sdpa else image_groups(token_type_ids)
        inputs = {}
        for kind in LAYER_TYPES:
            cos, sin = self.rotary[kind](positions, self.dtype)
            window = self.window[kind]
            inputs[kind] = LayerInputs(
                cos,
                sin,
                None if sdpa else prefill_mask(attention_mask, window, token_type_ids),
                fill_index=fill_index(lengths, prompt_len, self.cache_len[kind], not sdpa),
                slots=slots,
                window=window,
                image_reach=reach,
                groups=groups,
                last=lengths - 1 if sdpa else None,
            )
        return inputs

    def prefill_output(
        self, h: torch.Tensor, inputs: dict[str, LayerInputs], with_head: bool
    ) -> torch.Tensor:
        """The last layer, then the final norm (and the head `with_head`) of each row's
        last token.

        Only the last token's logits are returned, so the last layer computes attention,
        MLP and norms for that token alone: its other tokens' outputs would feed nothing
        (a 1/num_layers share of the prefill's products). The last token's result is the
        same computation; only its one-row products may sum in another order.
        """
        last = self.layers[-1]
        h = last(h, inputs[last.layer_type], last_token_only=True)
        return self._output(h, with_head)

    def decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        with_head: bool = True,
        every_token: bool = False,
    ) -> torch.Tensor:
        """Run `[B, T]` new tokens per row at consecutive `positions` (`[B]` for one token,
        or `[B, T]`), updating the caches in place; return the last token's logits (or,
        without the head, the final-normed hidden states), or `every_token`'s `[B, T, ...]`.

        Products see the `B * T` tokens as rows, which the `cpu` kernels sum each in one
        order (up to `SKINNY_MAX_ROWS` rows), and attention takes the tokens one at a
        time: every position's numbers are a one-token step's there.
        """
        h = self.embed(input_ids)
        inputs = self.decode_inputs(positions.reshape(input_ids.shape))
        for index in range(len(self.layers)):
            h = self.run_layer(index, h, inputs)
        if not every_token:
            return self._output(h, with_head)
        hidden = self.final_norm(h, every_token=True)
        if not with_head:
            return hidden
        return self.head(hidden.flatten(0, 1)).unflatten(0, hidden.shape[:2])

    def decode_inputs(self, positions: torch.Tensor) -> dict[str, LayerInputs]:
        """Each layer type's inputs for new tokens at `positions` `[B, T]`."""
        steps = positions.unbind(1)
        inputs = {}
        for kind in LAYER_TYPES:
            cos, sin = self.rotary[kind](positions, self.dtype)
            cache_len = self.cache_len[kind]
            inputs[kind] = LayerInputs(
                cos,
                sin,
                tuple(decode_mask(step, cache_len) for step in steps),
                positions=positions,
                filled=tuple(filled_slots(step, cache_len) for step in steps),
            )
        return inputs


class PrefillGraph(nn.Module):
    """`Gemma3Decoder.prefill` of one prompt into one cache row, as a module's forward, for
    tracing one prompt bucket, or every prompt length where the decoder's
    ops profile has `sdpa_prefill` (with the image inputs where the decoder takes them)."""

    def __init__(self, decoder: Gemma3Decoder, with_head: bool = True):
        super().__init__()
        self.decoder = decoder
        self.with_head = with_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        slot: torch.Tensor,
        *image_inputs: torch.Tensor,
    ) -> torch.Tensor:
        return self.decoder.prefill(input_ids, attention_mask, slot, self.with_head, *image_inputs)


class VerifyGraph(nn.Module):
    """`Gemma3Decoder.decode` of `T` tokens per row, returning every position's output,
    as a module's forward: the program that checks drafted tokens."""

    def __init__(self, decoder: Gemma3Decoder, with_head: bool = True):
        super().__init__()
        self.decoder = decoder
        self.with_head = with_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(input_ids, positions, self.with_head, every_token=True)


class LayerGraph(nn.Module):
    """One layer's share of a prefill (`prefill`) or decode pass (decode and verify), as a
    module's forward: `(h, *inputs) -> h` for layer `index`; a prefill's last layer ends
    the pass as `prefill_output` does, for the last token only and through the final norm
    (never the head: per-layer programs leave it, and decode's `final_norm`, to the runtime).

    The inputs are what the pass's layers are derived from: the attention mask (as
    `embed_prompt` returns it), the cache slot and, with images, the token types for a
    prefill; the positions `[B, T]` otherwise. Deriving each layer's inputs in every
    layer's program (a few small tensors) keeps its inputs few and fixed.
    """

    def __init__(self, decoder: Gemma3Decoder, index: int, prefill: bool):
        super().__init__()
        self.decoder = decoder
        self.index = index
        self.is_prefill = prefill

    def forward(self, h: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        decoder = self.decoder
        if not self.is_prefill:
            return decoder.run_layer(self.index, h, decoder.decode_inputs(*inputs))
        layer_inputs = decoder.prefill_inputs(*inputs)
        if self.index == len(decoder.layers) - 1:
            return decoder.prefill_output(h, layer_inputs, with_head=False)
        return decoder.run_layer(self.index, h, layer_inputs)


class DecodeGraph(nn.Module):
    """`Gemma3Decoder.decode` as a module's forward, for tracing the one-token step."""

    def __init__(self, decoder: Gemma3Decoder, with_head: bool = True):
        super().__init__()
        self.decoder = decoder
        self.with_head = with_head

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode(input_ids, positions, self.with_head)
