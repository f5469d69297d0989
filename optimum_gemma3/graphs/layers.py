"""Gemma-3 building blocks, each written to match transformers 4.57 operation for operation.

The order and dtype of every operation matters for exact parity: norms compute in fp32
and cast once, RoPE tables are fp32 cast to the activation dtype, softmax is fp32 and
cast back before multiplying by V (as transformers' eager attention does).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from . import kernels
from .ops import PLAIN, OpsProfile
from .parallel import all_reduce

# transformers' name for `F.gelu(x, approximate="tanh")`, Gemma-3's MLP activation.
GELU_TANH = "gelu_pytorch_tanh"

# Decode-sized products (batch rows x 1 token) go to `skinny_linear` up to this many rows:
# the kernels' own limit, defined once.
SKINNY_MAX_ROWS = kernels.MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, ops: OpsProfile) -> torch.Tensor:
    """`x @ weight.T`, by the product `ops` chooses for this shape (the `cpu` backend's
    profile: the fastest this host has).

    Why: decode multiplies 1-8 rows by each weight, so it is bound by how fast weights
    stream from memory, and BLAS streams them slowly here: on our AMD AVX2 hosts MKL's
    sgemm (what `F.linear` and Inductor's extern `mm` call) reads the tied 262144x640 fp32
    head at ~8 GB/s, oneDNN at ~17 GB/s for one row but ~7 GB/s for four, and bf16 has no
    fast path without AVX512-BF16. `skinny_linear` keeps ~15-17 GB/s at 1-8 rows in fp32
    and bf16 (README, "Speed"). Many-row (prefill) products are compute-bound: oneDNN in
    fp32 (MKL's sgemm is slower here). In bf16 without bf16 matmul instructions, torch's
    bf16 GEMM is a generic loop several times slower than fp32's, so the product runs on
    fp32 copies (exact) and is rounded once: the same fp32-sum, one-rounding contract as
    a bf16 GEMM, at fp32 speed.
    """
    rows = x.numel() // x.shape[-1]
    # A prompt of any length (a dynamic-length graph: `rows` symbolic) takes the many-row form.
    if ops.skinny_linear and isinstance(rows, int) and rows <= SKINNY_MAX_ROWS:
        return torch.ops.optimum_gemma3.skinny_linear(x, weight)
    if ops.bf16_products_in_fp32 and x.dtype == torch.bfloat16:
        return linear(x.float(), weight.float(), ops).to(x.dtype)
    if ops.onednn and x.dtype == torch.float32:
        return torch.ops.optimum_gemma3.dense(x, weight)
    return F.linear(x, weight)


class Linear(nn.Linear):
    """`nn.Linear` (same parameter names) computed by `linear` with its `ops` profile."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, ops: OpsProfile = PLAIN
    ):
        super().__init__(in_features, out_features, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = linear(x, self.weight, self.ops)
        return out if self.bias is None else out + self.bias


class QuantizedLinear(nn.Module):
    """A `Linear`'s weight-only int8 copy: `q8` `[out, in]` with one fp32 scale per output
    row (`scales`), as `quantize_rows` makes it from the weight, computed by the
    `quantized_linear` kernel. The self-draft's products (see `graphs.draft`): half the
    bytes of bf16 weights to read per step, and an approximation only a draft can use.
    """

    def __init__(self, linear: nn.Linear):
        """The stand-in for `linear`: its shape, and its bias (of its dtype) if it has one."""
        super().__init__()
        self.q8 = nn.Parameter(
            torch.empty(linear.out_features, linear.in_features, dtype=torch.int8),
            requires_grad=False,
        )
        self.scales = nn.Parameter(torch.empty(linear.out_features), requires_grad=False)
        has_bias = linear.bias is not None
        self.bias = nn.Parameter(torch.empty_like(linear.bias)) if has_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.optimum_gemma3.quantized_linear(x, self.q8, self.scales)
        return out if self.bias is None else out + self.bias


class RowParallelLinear(nn.Linear):
    """A rank's slice of the input features: partial products summed over ranks, then bias.

    `F.linear`, not `linear`, because its output enters a collective: a custom op's output
    is a Python-owned tensor, and gloo's worker thread releasing it needs the GIL that the
    compiled program's caller holds, which deadlocks the rank (seen on torch 2.13).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias


def output_linear(
    in_features: int, out_features: int, bias: bool, ops: OpsProfile, row_parallel: bool
) -> nn.Linear:
    """A block's last projection: a rank's `RowParallelLinear` slice with tensor
    parallelism (which ignores `ops`: see there), else a `Linear`."""
    if row_parallel:
        return RowParallelLinear(in_features, out_features, bias=bias)
    return Linear(in_features, out_features, bias=bias, ops=ops)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: `x * rsqrt(mean(x^2) + eps) * (1 + w)` in fp32, cast back once.

    The checkpoint stores the zero-centred `w`; folding `+1` into low-precision weights
    would lose precision, so it stays in fp32 arithmetic here.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).type_as(x)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed in fp32 from fixed inverse frequencies.

    Computing them from positions inside the graph (instead of a table indexed by position)
    keeps the graph small for 128k-position models and costs B*S*D/2 cosines per call.
    """

    def __init__(self):
        super().__init__()
        # Set by the owner (fp32 inverse frequencies and the cos/sin scale of the RoPE type).
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.attention_scaling = 1.0

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        freqs = positions.float()[..., None] * self.inv_freq  # [B, S, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, S, D]: broadcast over heads
        cos = angles.cos() * self.attention_scaling
        sin = angles.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX (rotate-half) RoPE."""
    return x * cos + rotate_half(x) * sin


def attention_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`q @ k^T` over head_dim.

    The one place that contracts head_dim for the scores: a Neuron variant that splits
    head_dim 256 into 128-wide chunks (sum of per-chunk products) replaces only this.
    """
    return q @ k.transpose(-1, -2)


def attention_values(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`P @ V`; produces head_dim, so a chunked variant concatenates per-chunk outputs."""
    return probs @ v


def bf16_attention_in_fp32(attention: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Run `attention(q, k, v, ...)` on fp32 copies of bf16 q/k/v, rounding the output once,
    in `cpu` programs on CPUs without bf16 matmul instructions (the `ops` keyword's
    `bf16_products_in_fp32`): there bf16 batched products take a slow path
    (the 512-token prefill took 15 s, 2.2x transformers' sdpa), while fp32 products and
    softmax from the bf16 inputs, rounded once like sdpa's fp32 accumulation, are faster
    and more accurate. Applied to the outermost attention call, so the copies are made
    once per layer, not once per query block.
    """

    @functools.wraps(attention)
    def wrapper(q, k, v, *args, ops: OpsProfile, **kwargs):
        if ops.bf16_products_in_fp32 and q.dtype == torch.bfloat16:
            return attention(q.float(), k.float(), v.float(), *args, **kwargs).to(q.dtype)
        return attention(q, k, v, *args, **kwargs)

    return wrapper


@bf16_attention_in_fp32
def grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked softmax attention with grouped query heads.

    q: [B, H, S, D]; k, v: [B, Hkv, L, D]; mask: [B, 1, S, L] (True = may attend).
    Query head h uses kv head h // (H / Hkv), as transformers' `repeat_kv` does, but the
    query heads of a group are stacked instead of copying K and V per query head.
    Masked scores are set to the dtype's lowest finite value (never -inf), so a row with
    nothing to attend to (a padding row) gives finite garbage that is never read.

    bf16 runs as transformers' eager attention does (bf16 products, fp32 softmax), except
    where `bf16_attention_in_fp32` applies.
    """
    batch, heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    q = q.reshape(batch, kv_heads, group * q_len, head_dim)
    scores = (attention_scores(q, k) * scale).view(batch, kv_heads, group, q_len, kv_len)
    scores = torch.where(mask[:, None], scores, torch.finfo(scores.dtype).min)
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = attention_values(probs.view(batch, kv_heads, group * q_len, kv_len), v)
    return out.view(batch, heads, q_len, head_dim)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    filled: torch.Tensor,
    scale: float,
    ops: OpsProfile,
) -> torch.Tensor:
    """One new token per row (q `[B, H, 1, D]`) over its layer's whole KV cache.

    `mask` (`[B, 1, 1, L]`) and `filled` (`[B]`) say the same thing two ways: row `b` may
    see exactly the cache slots `[0, filled[b])` (see `cache.decode_mask`). The kernel
    (`ops.decode_attention`) reads only those slots, from the cache in its own dtype;
    otherwise the masked `grouped_attention` runs.
    """
    if ops.decode_attention:
        return torch.ops.optimum_gemma3.decode_attention(q, k, v, filled, scale)
    return grouped_attention(q, k, v, mask, scale, ops=ops)


# Prefill attention runs this many queries at a time (see `blocked_prefill_attention`).
PREFILL_QUERY_BLOCK = 128


@bf16_attention_in_fp32
def blocked_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    window: int | None,
    image_reach: int = 0,
) -> torch.Tensor:
    """`grouped_attention` over a prompt, one block of queries at a time, each over only
    the keys it can see: `[start - window + 1, end)` (sliding) or `[0, end)` (full),
    widened by `image_reach` (the longest image block less one) on both sides where image
    tokens see the other tokens of their image, before and after them.

    Why: one `[S, S]` product computes every masked score too; at 2000 tokens a sliding
    layer needs a quarter of them and a full layer about half. Exact: the keys left out
    are masked for every query of the block (prompts are left-padded, so index distance
    is position distance), and masked keys weigh exactly 0 after the softmax.
    """
    # q, k, v are already in the dtype `ops` computes in (the decorator converted them):
    # the calls below need no conversion, whatever the profile.
    length = q.shape[2]
    if length <= PREFILL_QUERY_BLOCK:
        return grouped_attention(q, k, v, mask, scale, ops=PLAIN)
    blocks = []
    for start in range(0, length, PREFILL_QUERY_BLOCK):
        end = min(start + PREFILL_QUERY_BLOCK, length)
        first = 0 if window is None else max(0, start - max(window - 1, image_reach))
        last = min(length, end + image_reach)
        blocks.append(
            grouped_attention(
                q[:, :, start:end],
                k[:, :, first:last],
                v[:, :, first:last],
                mask[:, :, start:end, first:last],
                scale,
                ops=PLAIN,
            )
        )
    return torch.cat(blocks, dim=2)


# `sdpa_prefill_attention` takes a sliding layer's queries this many at a time; programs
# take prompts padded to a whole number of them.
SDPA_QUERY_BLOCK = 32


def _sdpa(q, k, v, scale: float, mask: torch.Tensor | None = None, causal: bool = False):
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
    )


@bf16_attention_in_fp32
def sdpa_prefill_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    window: int | None,
    groups: torch.Tensor | None = None,
    reach: int = 0,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over right-padded prompts by torch's `scaled_dot_product_attention` (a
    flash kernel on CPU), in a graph whose size does not depend on the prompt's length.

    q: `[B, H, S, D]`, or with `last` (`[B]`, each row's last real token) that token's
    `[B, H, 1, D]`; k, v: `[B, Hkv, S, D]`. Query `i` sees key `j` iff `j <= i` and
    (sliding) `i - j < window`, or both are tokens of the same image (`groups` `[B, S]`:
    each token's image number, -1 for text and padding; `reach`: the longest image less
    one), as `cache.prefill_mask` says.

    Why: one prefill program serves every prompt length (compiled once with a dynamic
    length, not once per bucket), so nothing may loop over the length in Python. With the
    padding on the right, no real token sees it (causality), so there is no padding mask:
    full layers of a text prompt attend causally, where the kernel skips the blocks above
    the diagonal; sliding layers too up to their window, then in blocks of
    `SDPA_QUERY_BLOCK` queries, each over the window of keys it can see (no work grows
    with the square of the length, see `_sliding_sdpa`); full layers with images take
    the `[S, S]` mask. Exact as a masked softmax: masked keys weigh exactly 0. Padding
    queries compute values nothing reads.
    """
    length = k.shape[2]
    if last is not None:
        distance = last[:, None] - torch.arange(length, device=q.device)[None]
        allowed = distance >= 0
        if window is not None:
            allowed = allowed & (distance < window)
        if groups is not None:
            own = groups.gather(1, last[:, None])
            allowed = allowed | ((groups == own) & (own >= 0))
        return _sdpa(q, k, v, scale, allowed[:, None, None])
    if window is None:
        return _causal_sdpa(q, k, v, scale, groups)
    return _sliding_sdpa(q, k, v, scale, window, groups, reach)


def _causal_sdpa(q, k, v, scale: float, groups=None) -> torch.Tensor:
    """The prompt's first `q.shape[2]` queries where no window cuts: causal over the same
    keys (the kernel skipping the blocks above the diagonal), or with images over every
    key with their mask (an image token also sees its image's later tokens)."""
    queries = q.shape[2]
    if groups is None:
        return _sdpa(q, k[:, :, :queries], v[:, :, :queries], scale, causal=True)
    query = torch.arange(queries, device=q.device)[:, None]
    key = torch.arange(k.shape[2], device=q.device)[None]
    own = groups[:, :queries, None]
    same = (own == groups[:, None, :]) & (own >= 0)
    return _sdpa(q, k, v, scale, ((query >= key) | same)[:, None])


def _sliding_sdpa(q, k, v, scale: float, window: int, groups, reach: int) -> torch.Tensor:
    """`sdpa_prefill_attention` of a sliding layer.

    The first `early` queries (whole blocks, before the window can cut) attend as in a
    full layer: causally, where the kernel skips the blocks above the diagonal, so a
    prompt no longer than the window pays nothing for it. The rest go in blocks of `Q`
    queries over their windows: block `b` holds queries `[e + b Q, e + (b + 1) Q)` and
    keys `[e + b Q - back, e + (b + 1) Q + reach)` (`back`: the window less one, or the
    longest image's reach), zero-padded outside the prompt and masked. Only the sizes of
    the two parts depend on the prompt's length.
    """
    batch, heads, length, dim = q.shape
    block = SDPA_QUERY_BLOCK
    tail = -length % block  # 0 in programs, whose prompts are whole blocks
    q, k, v = (F.pad(t, (0, 0, 0, tail)) for t in (q, k, v))
    groups = None if groups is None else F.pad(groups, (0, tail), value=-1)
    early_blocks = window // block
    early = torch.sym_min(length + tail, early_blocks * block) if early_blocks else 0
    blocks = (length + tail - early) // block
    back = max(window - 1, reach)
    width = back + block + reach

    def windows(t: torch.Tensor, pad: int = 0) -> torch.Tensor:
        """`[B, H, S, D]` -> each block's keys `[B * blocks, H, width, D]`."""
        index = early + torch.arange(blocks, device=t.device)[:, None] * block
        index = (index + torch.arange(width, device=t.device)[None]).flatten()
        t = F.pad(t, (0, 0, back, reach), value=pad).index_select(2, index)
        t = t.unflatten(2, (blocks, width)).transpose(1, 2)
        return t.reshape(batch * blocks, t.shape[2], width, t.shape[4])

    queries = q[:, :, early:].unflatten(2, (blocks, block)).transpose(1, 2)
    queries = queries.reshape(batch * blocks, heads, block, dim)
    starts = early + torch.arange(blocks, device=q.device)[:, None, None] * block
    query = starts + torch.arange(block, device=q.device)[None, :, None]
    key = starts - back + torch.arange(width, device=q.device)[None, None, :]
    distance = query - key
    allowed = ((distance >= 0) & (distance < window) & (key >= 0))[None]
    if groups is not None:
        query_groups = groups[:, early:].unflatten(1, (blocks, block))[..., None]
        key_groups = windows(groups[:, None, :, None], pad=-1).view(batch, blocks, 1, width)
        allowed = allowed | ((query_groups == key_groups) & (query_groups >= 0))
    mask = allowed.expand(batch, -1, -1, -1).reshape(batch * blocks, 1, block, width)
    rest = _sdpa(queries, windows(k), windows(v), scale, mask)
    rest = rest.view(batch, blocks, heads, block, dim).transpose(1, 2)
    rest = rest.reshape(batch, heads, blocks * block, dim)
    if early_blocks:
        rest = torch.cat([_causal_sdpa(q[:, :, :early], k, v, scale, groups), rest], dim=2)
    return rest[:, :, :length]


def gelu_tanh(x: torch.Tensor, ops: OpsProfile) -> torch.Tensor:
    """transformers' `gelu_pytorch_tanh`, `0.5 x (1 + tanh(u))` with
    `u = sqrt(2/pi) (x + 0.044715 x^3)`; as `x * sigmoid(2u)` where `ops.gelu_as_sigmoid`
    (`cpu` programs).

    The two are the same function (`(1 + tanh(u)) / 2 = sigmoid(2u)`), and the sigmoid
    form is no further from it in float64 than `F.gelu` (tests/test_kernels.py).
    Why: Inductor's CPU code computes tanh with a slow vector routine; the sigmoid form's
    exp is 2.4x faster (2.78 -> 1.15 ms for the 270M's 512x2048 gate, about 2% of its
    512-token prefill). Computed in fp32 and rounded once, as `F.gelu` does for bf16.
    """
    if not ops.gelu_as_sigmoid:
        return F.gelu(x, approximate="tanh")
    x32 = x.float()
    twice_u = (2 * math.sqrt(2 / math.pi)) * (x32 + 0.044715 * x32 * x32 * x32)
    return (x32 * torch.sigmoid(twice_u)).to(x.dtype)


class MLP(nn.Module):
    """`down(act(gate(x)) * up(x))`; Gemma-3's activation is gelu with the tanh approximation."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        activation: str,
        row_parallel: bool,
        ops: OpsProfile = PLAIN,
    ):
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False, ops=ops)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False, ops=ops)
        self.down_proj = output_linear(
            intermediate_size, hidden_size, False, ops, row_parallel=row_parallel
        )
        self.act = (
            functools.partial(gelu_tanh, ops=ops) if activation == GELU_TANH else ACT2FN[activation]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
