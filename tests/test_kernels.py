"""The CPU kernels (`optimum_gemma3/graphs/kernels`) and where graphs call them."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from optimum_gemma3.graphs import DecodeGraph, PrefillGraph, kernels
from optimum_gemma3.graphs.cache import decode_mask, filled_slots
from optimum_gemma3.graphs.layers import (
    gelu_tanh,
    grouped_attention,
    linear,
)
from optimum_gemma3.graphs.ops import PLAIN, OpsProfile
from tests.test_parity import build_decoder

needs_kernels = pytest.mark.skipif(
    not kernels.load(), reason="optimum-gemma3's CPU kernels need an AVX2 CPU and a C++ compiler"
)


def skinny_linear(x, weight):
    return torch.ops.optimum_gemma3.skinny_linear(x, weight)


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 11])
@pytest.mark.parametrize("features", [64, 100, 640])  # 100: not a multiple of 8 lanes
def test_fp32_products_match_f_linear(rows, features):
    generator = torch.Generator().manual_seed(rows * features)
    x = torch.randn(2, rows, features, generator=generator)
    weight = torch.randn(333, features, generator=generator)
    ours = skinny_linear(x, weight)
    assert ours.dtype == torch.float32 and ours.shape == (2, rows, 333)
    # fp32 sums in another order than BLAS: compare both with the exact products.
    exact = F.linear(x.double(), weight.double())
    blas_error = (F.linear(x, weight).double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 4 * blas_error + 1e-6


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("features", [100, 640])
def test_a_rows_products_do_not_depend_on_the_other_rows(dtype, features):
    """Batch invariance: the same input row gives the same bits alone, among 2..8 other
    rows, at any place in the batch, and past the kernels' row limit (blocks of rows)."""
    generator = torch.Generator().manual_seed(features)
    weight = torch.randn(333, features, generator=generator).to(dtype)
    row = torch.randn(1, features, generator=generator).to(dtype)
    alone = skinny_linear(row, weight)
    for rows in range(2, kernels.MAX_ROWS + 4):
        others = torch.randn(rows, features, generator=generator).to(dtype)
        place = rows // 2
        batch = torch.cat([others[:place], row, others[place + 1 :]])
        assert torch.equal(skinny_linear(batch, weight)[place], alone[0]), rows


@needs_kernels
@pytest.mark.parametrize("rows", [1, 4, 9])
def test_bf16_products_are_fp32_sums_rounded_once(rows):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 640, generator=generator).bfloat16()
    weight = torch.randn(1000, 640, generator=generator).bfloat16()
    ours = skinny_linear(x, weight)
    assert ours.dtype == torch.bfloat16
    exact = F.linear(x.double(), weight.double())
    # One rounding of an fp32 sum: within one bf16 ulp (2^-7 relative) of the exact value;
    # a bf16 accumulation would be off by several.
    torch.testing.assert_close(ours.double(), exact, rtol=2**-7, atol=1e-3)
    assert (ours == exact.bfloat16()).float().mean() > 0.99


@needs_kernels
def test_non_contiguous_weight_and_bad_inputs():
    x = torch.randn(3, 48)
    weight_t = torch.randn(48, 20)
    torch.testing.assert_close(skinny_linear(x, weight_t.t()), F.linear(x, weight_t.t()))
    with pytest.raises(RuntimeError, match="dtypes differ"):
        skinny_linear(x, weight_t.t().bfloat16())
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        skinny_linear(x.half(), weight_t.t().half())
    with pytest.raises(RuntimeError, match=r"weight \[N, K\] expected"):
        skinny_linear(x, weight_t)
    meta = skinny_linear(torch.empty(2, 1, 48, device="meta"), torch.empty(7, 48, device="meta"))
    assert meta.shape == (2, 1, 7) and meta.device.type == "meta"


@needs_kernels
def test_linear_picks_the_product_by_rows_and_dtype(monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.ops.optimum_gemma3, "skinny_linear", lambda x, w: calls.append("skinny") or x
    )
    weight = torch.randn(16, 16)
    ops = OpsProfile(skinny_linear=True, onednn=True)
    linear(torch.randn(8, 16), weight, ops)  # decode-sized
    assert calls == ["skinny"]
    many = torch.randn(9, 16)
    torch.testing.assert_close(linear(many, weight, ops), F.linear(many, weight))  # oneDNN
    assert calls == ["skinny"]


@needs_kernels
@pytest.mark.parametrize("features", [100, 640])
def test_dense_is_onednn_for_any_leading_shape(features):
    """`dense` is oneDNN's product as a C++ op: the same result as calling oneDNN from
    Python, for [B, S, K] inputs and non-contiguous weights; fp32 only, meta shapes."""
    generator = torch.Generator().manual_seed(features)
    x = torch.randn(2, 37, features, generator=generator)
    weight = torch.randn(features, 48, generator=generator).t()  # [48, K], not contiguous
    ours = torch.ops.optimum_gemma3.dense(x, weight)
    onednn = torch.ops.mkldnn._linear_pointwise(
        x.reshape(-1, features), weight.contiguous(), None, "none", [], ""
    )
    assert ours.shape == (2, 37, 48)
    assert torch.equal(ours, onednn.view(2, 37, 48))
    exact = x.double() @ weight.double().T
    blas_error = (F.linear(x, weight) - exact).abs().max()
    assert (ours - exact).abs().max() <= 4 * blas_error
    with pytest.raises(RuntimeError, match="float32 x and weight expected"):
        torch.ops.optimum_gemma3.dense(x.bfloat16(), weight.bfloat16())
    with pytest.raises(RuntimeError, match=r"x \[..., K\] and weight \[N, K\] expected"):
        torch.ops.optimum_gemma3.dense(x, weight.t())
    meta = torch.ops.optimum_gemma3.dense(
        torch.empty(2, 9, 48, device="meta"), torch.empty(7, 48, device="meta")
    )
    assert meta.shape == (2, 9, 7) and meta.device.type == "meta"


def decode_attention(q, k, v, filled, scale=0.3):
    return torch.ops.optimum_gemma3.decode_attention(q, k, v, filled, scale)


def attention_case(dtype, batch, heads, kv_heads, cache_len, head_dim, positions, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator).to(dtype)
    k, v = (
        torch.randn(batch, kv_heads, cache_len, head_dim, generator=generator).to(dtype)
        for _ in range(2)
    )
    return q, k, v, torch.tensor(positions)


# (batch, heads, kv_heads, cache_len, head_dim, positions): the 270m layout (4 query heads
# on one kv head) with a short, a partly filled and a wrapped sliding cache; the 27b
# layout (2 query heads per kv head, head_dim 128); head_dim 20 is not a multiple of 8.
ATTENTION_CASES = [
    (4, 4, 1, 64, 256, [0, 17, 63, 500]),
    (2, 32, 16, 40, 128, [39, 3]),
    (3, 6, 2, 33, 20, [32, 0, 100]),
]


@needs_kernels
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_fp32_decode_attention_matches_the_masked_graph(case):
    q, k, v, positions = attention_case(torch.float32, *case)
    cache_len = k.shape[2]
    ours = decode_attention(q, k, v, filled_slots(positions, cache_len))
    assert ours.shape == q.shape and ours.dtype == torch.float32
    mask = decode_mask(positions, cache_len)
    exact = grouped_attention(q.double(), k.double(), v.double(), mask, 0.3, ops=PLAIN)
    graph_error = (grouped_attention(q, k, v, mask, 0.3, ops=PLAIN).double() - exact).abs().max()
    assert (ours.double() - exact).abs().max() <= 4 * graph_error + 1e-6


@needs_kernels
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_bf16_decode_attention_is_fp32_math_rounded_once(case):
    """Read straight from bf16 caches, the result is the fp32 attention of the bf16 values
    rounded once: within one bf16 ulp of it, mostly equal."""
    q, k, v, positions = attention_case(torch.bfloat16, *case)
    cache_len = k.shape[2]
    ours = decode_attention(q, k, v, filled_slots(positions, cache_len))
    assert ours.dtype == torch.bfloat16
    fp32 = grouped_attention(
        q.float(), k.float(), v.float(), decode_mask(positions, cache_len), 0.3, ops=PLAIN
    )
    torch.testing.assert_close(ours.float(), fp32, rtol=2**-7, atol=1e-3)
    assert (ours == fp32.bfloat16()).float().mean() > 0.95


@needs_kernels
def test_decode_attention_reads_only_the_filled_slots():
    q, k, v, _ = attention_case(torch.float32, 2, 4, 1, 16, 32, [0, 0])
    filled = torch.tensor([3, 16])
    reference = decode_attention(q, k, v, filled)
    k[0, :, 3:], v[0, :, 3:] = float("nan"), float("nan")  # never read for row 0
    torch.testing.assert_close(decode_attention(q, k, v, filled), reference)


@needs_kernels
def test_decode_attention_rejects_bad_inputs():
    q, k, v, _ = attention_case(torch.float32, 2, 4, 2, 16, 32, [0, 0])
    ok = torch.tensor([1, 16])
    for filled in (torch.tensor([0, 16]), torch.tensor([1, 17])):
        with pytest.raises(RuntimeError, match=r"is outside \[1, 16\], the cache length"):
            decode_attention(q, k, v, filled)
    with pytest.raises(RuntimeError, match="lengths \\[B\\] of integers"):
        decode_attention(q, k, v, ok.float())
    with pytest.raises(RuntimeError, match="dtypes differ"):
        decode_attention(q, k.bfloat16(), v, ok)
    with pytest.raises(RuntimeError, match="H a multiple of Hkv"):
        decode_attention(q[:, :3], k, v, ok)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        decode_attention(q.half(), k.half(), v.half(), ok)
    meta = decode_attention(*(t.to("meta") for t in (q, k, v, ok)))
    assert meta.shape == q.shape and meta.device.type == "meta"


def graph_ops(exported) -> set[str]:
    return {str(node.target) for node in exported.graph.nodes}


STEP = (torch.zeros(3, 1, dtype=torch.long), torch.zeros(3, dtype=torch.long))


@needs_kernels
def test_each_decoder_traces_the_ops_of_its_own_profile(tiny_checkpoints):
    """Two decoders in one process, one plain (as traced for Neuron) and one with this
    host's profile (the `cpu` backend's), traced in turns: each graph holds its own
    decoder's forms, whatever was traced before. The host decode program streams weights
    through `skinny_linear`, and its prefill program (one prompt of 16 tokens) uses
    oneDNN's `dense`, with the head on the last token only. Only the decode program reads its caches
    through `decode_attention`."""
    folder = tiny_checkpoints("270m")
    host = build_decoder(folder, ops=OpsProfile.for_host())
    plain_decoder = build_decoder(folder)
    ids = torch.zeros(1, 16, dtype=torch.long)

    decode = graph_ops(torch.export.export(DecodeGraph(host), STEP, strict=True))
    plain = graph_ops(torch.export.export(DecodeGraph(plain_decoder), STEP, strict=True))
    prefill = graph_ops(
        torch.export.export(
            PrefillGraph(host), (ids, torch.ones_like(ids), torch.zeros(1).long()), strict=True
        )
    )
    assert "aten.linear.default" in plain
    assert not any(op.startswith("optimum_gemma3") for op in plain)
    assert "optimum_gemma3.skinny_linear.default" in decode
    assert "aten.linear.default" not in decode
    assert "optimum_gemma3.decode_attention.default" in decode
    assert "optimum_gemma3.decode_attention.default" not in prefill | plain
    # 3 rows: the head, and the last layer, which computes only the last token past K/V
    assert "optimum_gemma3.skinny_linear.default" in prefill
    assert "optimum_gemma3.dense.default" in prefill


def test_kernels_can_be_turned_off_or_missing(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("OPTIMUM_GEMMA3_DISABLE_KERNELS", "1")
    assert kernels.load.__wrapped__() is False
    assert kernels.unavailable_reason() == "OPTIMUM_GEMMA3_DISABLE_KERNELS is set"

    monkeypatch.delenv("OPTIMUM_GEMMA3_DISABLE_KERNELS")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built here yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with caplog.at_level(logging.WARNING):
        assert kernels.load.__wrapped__() is False
    assert "CPU kernels unavailable, using BLAS products: no C++ compiler" in caplog.text
    assert not any(tmp_path.rglob("*.so"))
    assert kernels.unavailable_reason().startswith("building them failed")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert kernels.load.__wrapped__() is False
    assert kernels.unavailable_reason() == (
        "the CPU lacks avx2+fma (torch reports CPU capability DEFAULT)"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_as_sigmoid_is_transformers_gelu(dtype):
    """`cpu` programs' gelu(tanh) form against `F.gelu(approximate="tanh")`, which
    transformers runs: no further from the float64 function than it, and the same limits
    far from zero. (Below about -5 the true values are tiny, F.gelu's tanh form gives 0
    and ours their tiny values: absolute errors, not relative ones, are compared.)"""
    x = torch.cat([torch.linspace(-12, 12, 100_001), torch.tensor([-1e30, -100.0, 100.0, 1e30])])
    x = x.to(dtype)
    ours = gelu_tanh(x, OpsProfile(gelu_as_sigmoid=True))
    theirs = F.gelu(x, approximate="tanh")
    x64 = x.double()  # the same function, without the tanh form's cancellation below 0
    exact = x64 * torch.sigmoid(2 * math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64**3))
    assert ours.dtype == dtype
    our_error = (ours.double() - exact).abs().max()
    their_error = (theirs.double() - exact).abs().max()
    assert our_error <= 1.5 * their_error
    torch.testing.assert_close(
        ours, theirs, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-6
    )
    assert torch.equal(ours[-4:], theirs[-4:])


def test_gelu_form_follows_the_decoder_profile(tiny_checkpoints):
    """Without any kernels: a decoder built with `gelu_as_sigmoid` traces sigmoid where a
    plain one, built in the same process, traces transformers' gelu."""
    folder = tiny_checkpoints("270m")
    sigmoid = build_decoder(folder, ops=OpsProfile(gelu_as_sigmoid=True))
    plain = build_decoder(folder)
    sigmoid_ops = graph_ops(torch.export.export(DecodeGraph(sigmoid), STEP, strict=True))
    plain_ops = graph_ops(torch.export.export(DecodeGraph(plain), STEP, strict=True))
    assert "aten.sigmoid.default" in sigmoid_ops and "aten.gelu.default" not in sigmoid_ops
    assert "aten.gelu.default" in plain_ops and "aten.sigmoid.default" not in plain_ops
