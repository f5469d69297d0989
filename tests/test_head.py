"""The screened head: greedy steps compute only the logits their argmax can pick.

`screened_linear` must return skinny_linear's own values wherever it returns a value,
and a floor every other logit is below; the token loop must use it only where that gives
the argmax of every logit, and fall back to every logit where a processor masked the
candidates away.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensLogitsProcessor,
)

from optimum_gemma3.generation import NextTokenLogits, decode_loop
from optimum_gemma3.head import HostHead
from optimum_gemma3.modeling.layers import SKINNY_MAX_ROWS
from tests.test_kernels import needs_kernels, skinny_linear


def quantize_rows(weight):
    return torch.ops.optimum_gemma3.quantize_rows(weight)


def screened_linear(x, weight):
    return torch.ops.optimum_gemma3.screened_linear(x, weight, *quantize_rows(weight))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_rounds_each_row_to_its_scale(dtype):
    weight = torch.randn(300, 100, generator=torch.Generator().manual_seed(0)).to(dtype)
    weight[7] = 0
    q8, scales = quantize_rows(weight)
    assert q8.dtype == torch.int8 and scales.dtype == torch.float32
    w = weight.float()
    assert torch.equal(scales, w.abs().amax(1) / 127)
    assert int(q8.abs().max()) == 127 and not q8[7].any() and scales[7] == 0
    error = (w.double() - scales.double()[:, None] * q8.double()).abs()
    # Half a level, plus the rounding of w / s (at most 128 fp32 units in the last place).
    assert (error <= scales.double()[:, None] * (0.5 + 128 * 2**-24)).all()


def tied_weight(dtype, features: int, generator) -> torch.Tensor:
    """Random rows, then a cluster of 200 rows too close to tell apart in int8: they differ
    by 1e-5 in fp32 (the screen must pass them all to the exact product) and are exact
    copies in bf16 (a tie the argmax breaks by lowest id)."""
    weight = torch.randn(3000, features, generator=generator)
    base = torch.randn(features, generator=generator)
    noise = 1e-5 * torch.randn(200, features, generator=generator)
    weight[1000:1200] = base + (noise if dtype == torch.float32 else 0)
    return weight.to(dtype), base


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("features", [100, 640])  # 100: not a multiple of 8 lanes
def test_screened_values_are_skinny_linear_and_bound_the_rest(dtype, rows, features):
    generator = torch.Generator().manual_seed(rows * features)
    weight, base = tied_weight(dtype, features, generator)
    x = torch.randn(rows, features, generator=generator)
    x[0] = base.sign() * x[0].abs()  # row 0's largest logits are in the cluster
    x = (3 * x).to(dtype)
    full = skinny_linear(x, weight)
    ours, floor = screened_linear(x, weight)
    assert ours.dtype == dtype and ours.shape == full.shape and floor.shape == (rows,)
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], full[kept])  # bit for bit
    assert torch.equal(ours.float().argmax(-1), full.float().argmax(-1))
    assert kept[0, 1000:1200].all()  # the whole cluster is computed exactly
    full32 = full.float()
    # The floor is a computed logit (the anchor's), and every token not computed is below.
    assert ((ours.float() == floor[:, None]) & kept).any(-1).all()
    assert ((full32 < floor[:, None]) | kept).all()
    # And it screens: few of the random rows are computed.
    random_rows = torch.cat([kept[:, :1000], kept[:, 1200:]], dim=1)
    assert random_rows.float().mean() < 0.05


@needs_kernels
def test_screened_linear_computes_everything_for_non_finite_inputs():
    weight = torch.randn(500, 64)
    x = torch.randn(2, 64)
    x[1, 3] = torch.inf
    ours, floor = screened_linear(x, weight)
    torch.testing.assert_close(ours, skinny_linear(x, weight), rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(floor).all() and (floor < 0).all()


@needs_kernels
def test_screened_linear_refuses_bad_inputs():
    weight = torch.randn(50, 64)
    q8, scales = quantize_rows(weight)
    with pytest.raises(RuntimeError, match="q8 must be int8"):
        torch.ops.optimum_gemma3.screened_linear(torch.randn(1, 64), weight, q8.float(), scales)
    with pytest.raises(RuntimeError, match=r"float32 scales \[50\]"):
        torch.ops.optimum_gemma3.screened_linear(torch.randn(1, 64), weight, q8, scales[:10])
    with pytest.raises(RuntimeError, match="1 to 8 rows"):
        torch.ops.optimum_gemma3.screened_linear(torch.randn(9, 64), weight, q8, scales)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.optimum_gemma3.screened_linear(torch.randn(1, 64), weight.bfloat16(), q8, scales)


@needs_kernels
def test_host_head_screens_few_rows_and_computes_many_in_full():
    head = HostHead(torch.randn(700, 64))
    few = torch.randn(2, 64)
    logits, floor = head.next_token_logits(few).near_max()
    assert torch.isinf(logits).any() and torch.isfinite(floor).all()
    many = torch.randn(SKINNY_MAX_ROWS + 1, 64)
    logits, floor = head.next_token_logits(many).near_max()
    assert torch.equal(logits, head.logits(many)) and (floor == -torch.inf).all()


# -- the token loop's choice ---------------------------------------------------------------


class CountingLogits(NextTokenLogits):
    """Logits 0..9 for one row; `near_max` returns tokens 8 and 9 exactly, floor 8."""

    calls: list[str]

    def __init__(self, calls: list[str]):
        logits = torch.arange(10, dtype=torch.float32)[None]
        screened = torch.full_like(logits, -torch.inf)
        screened[0, 8:] = logits[0, 8:]
        super().__init__(
            lambda: calls.append("full") or logits,
            lambda: calls.append("near_max") or (screened, torch.tensor([8.0])),
        )


def first_token(calls: list[str], **kwargs) -> int:
    def prefill(ids, mask):
        return CountingLogits(calls)

    out = decode_loop(prefill, None, torch.tensor([[5, 6]]), torch.ones(1, 2), 1, **kwargs)
    return int(out.sequences[0, -1])


def test_greedy_steps_read_only_the_near_max_logits():
    calls = []
    assert first_token(calls) == 9 and calls == ["near_max"]
    calls = []
    suppress_9 = LogitsProcessorList([SuppressTokensLogitsProcessor([9])])
    assert first_token(calls, logits_processor=suppress_9) == 8 and calls == ["near_max"]


def test_masking_every_candidate_falls_back_to_every_logit():
    calls = []
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor([8, 9])])
    assert first_token(calls, logits_processor=suppress) == 7
    assert calls == ["near_max", "full"]


class ReadsScores(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])),
        dict(stopping_criteria=StoppingCriteriaList([ReadsScores()])),
        dict(output_logits=True),
        dict(do_sample=True),
    ],
    ids=["value-changing processor", "criterion reading scores", "output_logits", "sampling"],
)
def test_other_steps_read_every_logit(kwargs):
    calls = []
    first_token(calls, **kwargs)
    assert calls == ["full"]
