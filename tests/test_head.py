"""The screened head: greedy and top-k sampling steps compute only the logits they can pick.

`screened_linear` must return skinny_linear's own values wherever it returns a value,
and a floor that k of them reach and every other logit is below; the token loop must use
it only where that gives the scores every logit would give, and fall back to every logit
where a processor masked the candidates away.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.generation import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    SuppressTokensAtBeginLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from optimum_gemma3.graphs.layers import SKINNY_MAX_ROWS
from optimum_gemma3.graphs.ops import OpsProfile
from optimum_gemma3.runtime.head import HostHead
from optimum_gemma3.runtime.logits import NextTokenLogits
from optimum_gemma3.runtime.loop import decode_loop
from optimum_gemma3.runtime.selection import (
    ID_MASKING_PROCESSORS,
    MAX_SCREENED_TOP_K,
    apply_processors,
    first_argmax,
    masked_token_ids,
    screened_selection,
    screened_top,
    step_scores,
)
from tests.test_kernels import needs_kernels, skinny_linear


def quantize_rows(weight):
    return torch.ops.optimum_gemma3.quantize_rows(weight)


def screened_linear(x, weight, k=1):
    return torch.ops.optimum_gemma3.screened_linear(x, weight, *quantize_rows(weight), k=k)


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
    # Exactly round(w / s) in fp32, ties to even (the kernel runs 8 lanes, then a tail).
    levels = torch.where(scales[:, None] > 0, torch.round(w / scales[:, None]), 0)
    assert torch.equal(q8, levels.clamp(-127, 127).to(torch.int8))


@needs_kernels
@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_quantize_rows_refuses_non_finite_weights(bad):
    weight = torch.randn(40, 100)
    weight[17, 3] = bad
    with pytest.raises(RuntimeError, match="weight row 17 is not finite"):
        quantize_rows(weight)


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
@pytest.mark.parametrize("k", [1, 50])  # greedy; transformers' default top-k
def test_screened_values_are_skinny_linear_and_bound_the_rest(dtype, rows, features, k):
    generator = torch.Generator().manual_seed(rows * features)
    weight, base = tied_weight(dtype, features, generator)
    x = torch.randn(rows, features, generator=generator)
    x[0] = base.sign() * x[0].abs()  # row 0's largest logits are in the cluster
    x = (3 * x).to(dtype)
    full = skinny_linear(x, weight)
    ours, floor = screened_linear(x, weight, k)
    assert ours.dtype == dtype and ours.shape == full.shape and floor.shape == (rows,)
    kept = torch.isfinite(ours)
    assert torch.equal(ours[kept], full[kept])  # bit for bit
    full32, ours32 = full.float(), ours.float()
    assert torch.equal(ours32.argmax(-1), full32.argmax(-1))
    assert torch.equal(ours32.topk(k).values, full32.topk(k).values)
    assert kept[0, 1000:1200].all()  # the whole cluster is computed exactly
    # The floor is a computed logit (an anchor's) that k computed logits reach, and every
    # token not computed is below it.
    assert ((ours32 == floor[:, None]) & kept).any(-1).all()
    assert ((ours32 >= floor[:, None]).sum(-1) >= k).all()
    assert ((full32 < floor[:, None]) | kept).all()
    # And it screens: few of the 2800 random rows are computed (for any of the rows).
    random_rows = torch.cat([kept[:, :1000], kept[:, 1200:]], dim=1)
    assert int(random_rows.any(0).sum()) <= rows * (3 * k + 10)


def opposite_orders(dtype, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, 640] and two weight rows whose int8 screen orders them opposite to their exact
    logits by 317/640 of l1 s, 99% of the largest possible error (l1 s / 2), so only a
    radius of at least 0.4953 l1 s keeps the exact argmax (`screened_linear`'s is 0.5147).

    Scale s = 2^-7 for both rows (a level of -127). Three entries with x = 1 and the same
    levels (-127, -127, -63) in both rows shift every logit by -317 s, so the floor is near
    0 and bf16's wide margin (2^-5 |F|) adds nothing. On the other 637 entries x = +-1 and
    token 1's weight is 0.498 s x (0.5 - 2^-9, the largest bf16 below half a level): level
    0, error 0.498 s each, so a = -317 s but f = (-317 + 637 * 0.498) s = +0.256 s. Token
    0's weight is s x on 317 of them: levels exact, a = f = 0. So the screen ranks token 0
    first by 317 s, but token 1 is the exact argmax. Every value and sum is exact in bf16
    and fp32 (multiples of 2^-16 below 8).
    """
    scale, half = 2.0**-7, 0.5 - 2.0**-9
    signs = torch.randint(0, 2, (637,), generator=generator).float() * 2 - 1
    x = torch.cat([torch.ones(3), signs])[None]
    shift = scale * torch.tensor([-127.0, -127.0, -63.0])
    exact_levels = torch.cat([signs[:317], torch.zeros(320)])
    weight = torch.stack(
        [torch.cat([shift, scale * exact_levels]), torch.cat([shift, scale * half * signs])]
    )
    return x.to(dtype), weight.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_screen_radius_is_just_wide_enough_for_the_worst_rounding(dtype):
    """Gaussian data reaches ~13% of the radius; this reaches 96%, so a radius 4% short
    (a 0.48 where the bound's 0.5 is) loses the exact argmax."""
    x, weight = opposite_orders(dtype, torch.Generator().manual_seed(7))
    q8, scales = quantize_rows(weight)
    l1, s = 640, 2.0**-7
    assert torch.equal(scales, torch.tensor([s, s]))
    screened = scales.double() * (q8.double() @ x[0].double())
    assert screened[0] - screened[1] == 317 * s > 0.99 * l1 * s / 2
    full = skinny_linear(x, weight)
    assert torch.equal(full.double(), F.linear(x.double(), weight.double()).to(dtype).double())
    assert int(full.float().argmax()) == 1

    ours, floor = screened_linear(x, weight)
    assert int(ours.float().argmax()) == 1 and ours[0, 1] == full[0, 1]
    assert floor[0] == full[0, 0].float() == 0


def screen_logits(x, q8, scales, isa="best"):
    """The screen's logits [M, N] and per-row radius, with the instructions `isa` names
    (skips where this CPU lacks them)."""
    try:
        return torch.ops.optimum_gemma3.screen_logits(x, q8, scales, isa)
    except RuntimeError as error:
        if "not available here" in str(error):
            pytest.skip(f"this CPU has no {isa} path ({error})")
        raise


def l1_radius(x: torch.Tensor) -> torch.Tensor:
    """The bound's term for the weights' int8 rounding alone (header of
    screened_linear.cpp): what the radius was before x was quantized too."""
    g = (x.shape[-1] + 2) * 2.0**-24
    gamma = g / (1 - g)
    return x.float().abs().sum(-1) * (0.5 + 384 * gamma) * (1 + 4 * gamma)


@needs_kernels
@pytest.mark.parametrize("isa", ["avx2", "vnni"])
@pytest.mark.parametrize("features", [100, 640, 5376])  # 5376: Gemma-3 27b's width
def test_screen_logits_are_exact_integer_sums_within_the_radius(isa, features):
    """Every path gives the same screened logits (exact int32 sums, then the same three
    fp32 roundings), for 1 to 8 rows, and every exact logit is within the radius; rows
    with an outlier feature (the x term of the radius) included."""
    generator = torch.Generator().manual_seed(features)
    weight = torch.randn(700, features, generator=generator)
    weight[5] = 0  # a zero row: scale 0
    q8, scales = quantize_rows(weight)
    for rows in range(1, SKINNY_MAX_ROWS + 1):
        x = torch.randn(rows, features, generator=generator)
        x[0, 3] = 300.0  # an outlier: a coarse step for the row's other features
        if rows > 1:
            x[1] = 0  # an all-zero row: step 0
        logits, radius = screen_logits(x, q8, scales, isa)
        reference, _ = screen_logits(x, q8, scales, "avx2")
        assert torch.equal(logits, reference)
        exact = x.double() @ weight.double().T
        error = (exact - logits.double()).abs()
        assert (error <= radius.double()[:, None] * scales.double()).all()
        assert (radius >= l1_radius(x)).all()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_linear_is_the_screens_product(dtype):
    """The self-draft's product: the screen's exact int8 sums (the same on AVX2 and VNNI,
    see above) for every row, in blocks of 8 past 8 rows and with any leading dims, rounded
    to x's dtype once, and within int8 rounding of the real product."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(300, 640, generator=generator)
    q8, scales = quantize_rows(weight)
    x = torch.randn(2, 7, 640, generator=generator).to(dtype)  # 14 rows: blocks of 8 and 6
    out = torch.ops.optimum_gemma3.quantized_linear(x, q8, scales)
    assert out.shape == (2, 7, 300) and out.dtype == dtype
    rows = x.reshape(-1, 640)
    screened = torch.cat([screen_logits(block, q8, scales)[0] for block in rows.split(8)])
    assert torch.equal(out.reshape(-1, 300), screened.to(dtype))
    real = x.double() @ weight.double().T
    assert (out.double() - real).abs().max() < 0.02 * real.abs().max()
    with pytest.raises(RuntimeError, match="quantized_linear: q8 must be int8"):
        torch.ops.optimum_gemma3.quantized_linear(x, weight, scales)
    with pytest.raises(RuntimeError, match=r"quantized_linear: float32 scales \[300\]"):
        torch.ops.optimum_gemma3.quantized_linear(x, q8, scales[1:])


def quantized_x_worst_case() -> tuple[torch.Tensor, torch.Tensor]:
    """x [1, 640] whose levels lose almost half a step on 639 features, and two tokens the
    screen therefore orders wrongly by more than the weights' rounding alone allows.

    L = 26420 levels for K = 640; x_0 = L t with t = 2^-10 sets the step t, and every other
    x_k = 0.49 t rounds to level 0. Token 0's weight is 127/128 (scale 2^-7, level 127,
    exact) on those 639 features and 0 on feature 0: screened logit 0, exact logit
    639 * 0.49 t * 127/128 = 0.303. Token 1's is 0.006 on feature 0 only: 0.155 both
    ways. So token 0 is the argmax, but the weights' rounding term alone (0.5147 l1 s =
    0.105) cannot lift its screened 0 to 0.155; the x term (127 K t / 2 * s = 0.31) does.
    """
    levels, step = 26420, 2.0**-10
    x = torch.full((1, 640), 0.49 * step)
    x[0, 0] = levels * step
    weight = torch.zeros(2, 640)
    weight[0, 1:] = 127 / 128
    weight[1, 0] = 0.006
    return x, weight


@needs_kernels
def test_screen_radius_covers_the_rounding_of_x():
    x, weight = quantized_x_worst_case()
    q8, scales = quantize_rows(weight)
    logits, radius = screen_logits(x, q8, scales)
    full = skinny_linear(x, weight)
    assert int(full.argmax()) == 0 and logits[0, 0] == 0 and logits[0, 1] > 0.15
    # Without the x term token 0 could not reach token 1's logit: the screen would drop it.
    assert logits[0, 0] + l1_radius(x)[0] * scales[0] < full[0, 1]
    assert logits[0, 0] + radius[0] * scales[0] >= full[0, 0]
    ours, floor = screened_linear(x, weight)
    assert int(ours.argmax()) == 0 and ours[0, 0] == full[0, 0]


def unscreenable(case: str, dtype):
    """x, weight, q8, scales for which the screen's bound does not hold: every logit then."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(500, 64, generator=generator)
    x = torch.randn(2, 64, generator=generator)
    if case == "x not finite":
        x[1, 3] = torch.inf
    elif case == "logit overflows":  # token 123's exact logit is +inf in row 0
        x *= 1e20
        weight[123] = 1e20 * x[0].sign()
    elif case == "screen overflows":  # every exact logit finite, but 127 |x| overflows
        x[:, 0], x[:, 1], x[:, 2:] = 1e37, -1e37, 1e33 * x[:, 2:]
        weight[:, :2] = 4  # q = 127: x.q sums +inf and -inf, while x.w cancels
    x, weight = x.to(dtype), weight.to(dtype)
    q8, scales = quantize_rows(weight)
    if case.startswith("anchor's logit"):  # a weight changed after its int8 copy was made
        x[0, 5] = 1
        anchor = int((scales * (q8.float() @ x[0].float())).argmax())  # row 0's best screened
        weight[anchor, 5] = torch.nan if case.endswith("NaN") else torch.inf
    return x, weight, q8, scales


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "case",
    [
        "x not finite",
        "logit overflows",
        "screen overflows",
        "anchor's logit NaN",
        "anchor's logit +inf",
    ],
)
def test_screened_linear_computes_every_logit_where_the_bound_fails(case, dtype):
    """Where a sum could overflow or a threshold would be NaN, every logit, exactly as the
    full product gives them, with a floor of -inf (not a row of -inf that greedy would
    read as token 0)."""
    x, weight, q8, scales = unscreenable(case, dtype)
    ours, floor = torch.ops.optimum_gemma3.screened_linear(x, weight, q8, scales, k=1)
    full = skinny_linear(x, weight)
    torch.testing.assert_close(ours, full, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(ours.float().argmax(-1), full.float().argmax(-1))
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
    for k in (0, 51):
        with pytest.raises(RuntimeError, match=r"k must be 1 to 50 \(the weight's rows\)"):
            torch.ops.optimum_gemma3.screened_linear(torch.randn(1, 64), weight, q8, scales, k=k)


@needs_kernels
def test_host_head_screens_any_number_of_rows():
    """Past `screened_linear`'s row limit the head screens in blocks of rows."""
    head = HostHead(torch.randn(700, 64), OpsProfile.for_host())
    for rows in (2, 2 * SKINNY_MAX_ROWS + 1):
        hidden = torch.randn(rows, 64)
        logits, floor = head.next_token_logits(hidden).near_top(1)
        assert logits.shape == (rows, 700) and floor.shape == (rows,)
        assert torch.isfinite(logits).any(-1).all() and torch.isfinite(floor).all()
        assert torch.isinf(logits).any(-1).all()  # screened: most logits not computed
        assert torch.equal(logits.argmax(-1), head.logits(hidden).argmax(-1))


@pytest.mark.parametrize("length", [4, 5, 6, 9, 10, 40])
def test_masking_processors_give_their_own_scores_without_a_vocabulary_mask(length):
    """The masking processors applied as ids set to -inf: the processors' own results, bit
    for bit, active or not at this length, ids outside the vocabulary ignored as theirs
    ignore them."""
    eos = [1, 7, 500]  # 500: outside the 300-token vocabulary
    processors = [
        MinNewTokensLengthLogitsProcessor(
            prompt_length_to_skip=3, min_new_tokens=6, eos_token_id=eos
        ),
        MinLengthLogitsProcessor(min_length=10, eos_token_id=eos),
        SuppressTokensLogitsProcessor([2, 3, 299, 400]),
        SuppressTokensAtBeginLogitsProcessor([4, 5], begin_index=5),
    ]
    sequences = torch.arange(2 * length).reshape(2, length)
    scores = torch.randn(2, 300, generator=torch.Generator().manual_seed(length))
    for processor in processors:
        assert type(processor) in ID_MASKING_PROCESSORS
        ours = apply_processors([processor], sequences, scores)
        assert torch.equal(ours, processor(sequences, scores))
        assert ours is not scores
    assert torch.equal(
        apply_processors(processors, sequences, scores),
        LogitsProcessorList(processors)(sequences, scores),
    )
    with pytest.raises(TypeError, match="TopKLogitsWarper is not one of"):
        masked_token_ids(TopKLogitsWarper(5), length, 300)


# -- the token loop's choice ---------------------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "processors",
    [
        [SuppressTokensLogitsProcessor([3])],
        [TopKLogitsWarper(20), TopPLogitsWarper(0.9)],
        [TemperatureLogitsWarper(0.7), TopKLogitsWarper(50), TopPLogitsWarper(0.95)],
        [SuppressTokensLogitsProcessor([3]), TemperatureLogitsWarper(1.5), TopKLogitsWarper(5)],
    ],
    ids=["greedy", "top-k, top-p", "temperature, top-k, top-p", "masked, temperature, top-k"],
)
def test_screened_steps_give_the_scores_every_logit_gives(dtype, processors):
    """With the head's real screen, a greedy step picks the argmax of every logit, and a
    sampling step's scores are bit for bit those of every logit, so are its draws."""
    generator = torch.Generator().manual_seed(3)
    head = HostHead(torch.randn(3000, 64, generator=generator).to(dtype), OpsProfile.for_host())
    hidden = (3 * torch.randn(4, 64, generator=generator)).to(dtype)
    sequences = torch.zeros(4, 1, dtype=torch.long)
    do_sample = any(isinstance(p, TopKLogitsWarper) for p in processors)
    processors = LogitsProcessorList(processors)
    screen = screened_selection(processors, do_sample)
    assert screen is not None
    calls = []
    step = NextTokenLogits(
        lambda: calls.append("full") or head.logits(hidden),
        lambda k: calls.append("near_top") or head.screened(hidden, k),
    )
    _, screened = step_scores(step, sequences, processors, screen)
    _, every = step_scores(NextTokenLogits.of(head.logits(hidden)), sequences, processors, None)
    assert calls == ["near_top"]
    if not do_sample:
        assert torch.equal(screened.argmax(-1), every.argmax(-1))
        return
    assert torch.equal(screened, every)
    probabilities = torch.softmax(every, -1)
    for seed in range(5):
        torch.manual_seed(seed)
        drawn = torch.multinomial(torch.softmax(screened, -1), 1)
        torch.manual_seed(seed)
        assert torch.equal(drawn, torch.multinomial(probabilities, 1))


@needs_kernels
def test_top_k_beyond_the_vocabulary_keeps_every_token():
    head = HostHead(torch.randn(30, 64), OpsProfile.for_host())
    hidden = torch.randn(2, 64)
    processors = LogitsProcessorList([TopKLogitsWarper(50)])
    screen = screened_selection(processors, do_sample=True)
    step = head.next_token_logits(hidden)
    _, scores = step_scores(step, torch.zeros(2, 1, dtype=torch.long), processors, screen)
    assert torch.equal(scores, head.logits(hidden))


class CountingLogits(NextTokenLogits):
    """Logits 0..9 for one row; `near_top(k)` returns tokens 9 - k to 9 exactly, floor 9 - k
    (k + 1 tokens reach it, the rest are below)."""

    calls: list[str]

    def __init__(self, calls: list[str]):
        logits = torch.arange(10, dtype=torch.float32)[None]

        def near_top(k):
            calls.append(f"near_top({k})")
            screened = torch.full_like(logits, -torch.inf)
            screened[0, 9 - k :] = logits[0, 9 - k :]
            return screened, torch.tensor([9.0 - k])

        super().__init__(lambda: calls.append("full") or logits, near_top)


def first_token(calls: list[str], **kwargs) -> int:
    def prefill(ids, mask):
        return CountingLogits(calls)

    out = decode_loop(prefill, None, torch.tensor([[5, 6]]), torch.ones(1, 2), 1, **kwargs)
    return int(out.sequences[0, -1])


def test_greedy_steps_read_only_the_near_max_logits():
    calls = []
    assert first_token(calls) == 9 and calls == ["near_top(1)"]
    calls = []
    suppress_9 = LogitsProcessorList([SuppressTokensLogitsProcessor([9])])
    assert first_token(calls, logits_processor=suppress_9) == 8 and calls == ["near_top(1)"]


def sampled(calls: list[str], *processors) -> int:
    return first_token(calls, do_sample=True, logits_processor=LogitsProcessorList(processors))


def test_top_k_sampling_reads_only_the_near_top_logits():
    calls = []
    assert sampled(calls, TopKLogitsWarper(3)) in (7, 8, 9) and calls == ["near_top(3)"]
    calls = []
    warm = TemperatureLogitsWarper(0.5), TopKLogitsWarper(3), TopPLogitsWarper(0.9)
    assert sampled(calls, *warm) in (7, 8, 9) and calls == ["near_top(3)"]
    calls = []
    suppress_9 = SuppressTokensLogitsProcessor([9])
    assert sampled(calls, suppress_9, TopKLogitsWarper(2)) in (7, 8)
    assert calls == ["near_top(2)"]


def test_masking_every_candidate_falls_back_to_every_logit():
    calls = []
    suppress = LogitsProcessorList([SuppressTokensLogitsProcessor([8, 9])])
    assert first_token(calls, logits_processor=suppress) == 7
    assert calls == ["near_top(1)", "full"]
    calls = []  # top-3 of near_top(3) (tokens 6..9, floor 6) is not known once 8, 9 are gone
    suppress = SuppressTokensLogitsProcessor([8, 9])
    assert sampled(calls, suppress, TopKLogitsWarper(3)) in (5, 6, 7)
    assert calls == ["near_top(3)", "full"]


def test_the_screened_top_needs_k_unmasked_candidates_at_or_above_the_floor():
    """Token 1's logit is exact but below the floor: a token the screen left out may beat
    it, so it cannot be among the k largest that the screen vouches for."""
    logits = torch.tensor([[-torch.inf, 7.0, 10.0, -torch.inf, 9.0]])
    floor = torch.tensor([8.0])
    assert screened_top(logits, logits, floor, 1).tolist() == [[2]]
    assert screened_top(logits, logits, floor, 2).tolist() == [[2, 4]]
    assert screened_top(logits, logits, floor, 3) is None
    masked = logits.index_fill(-1, torch.tensor([2]), -torch.inf)
    assert screened_top(logits, masked, floor, 1).tolist() == [[4]]
    assert screened_top(logits, masked, floor, 2) is None
    cooled = masked / 0.5  # a temperature keeps the order
    assert screened_top(logits, cooled, floor, 1).tolist() == [[4]]


@pytest.mark.parametrize("width", [1, 7, 12, 64, 97, 544])
def test_first_argmax_is_torch_argmax(width):
    """Ties (few distinct values), NaN, +-inf and all -inf rows: the same index as argmax."""
    generator = torch.Generator().manual_seed(width)
    for trial in range(200):
        scores = torch.randint(0, 4, (3, width), generator=generator).float()
        special = [None, float("nan"), torch.inf, -torch.inf][trial % 4]
        if special is not None:
            scores[scores == 3] = special
        if trial % 50 == 0:
            scores[1] = -torch.inf
        assert torch.equal(first_argmax(scores), scores.argmax(-1)), scores


class ReadsScores(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        assert scores is None  # transformers passes scores only when it keeps them
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_stopping_criteria_do_not_force_every_logit():
    calls = []
    first_token(calls, stopping_criteria=StoppingCriteriaList([ReadsScores()]))
    assert calls == ["near_top(1)"]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])),
        dict(output_logits=True),
        dict(do_sample=True),
        dict(do_sample=True, logits_processor=LogitsProcessorList([TopPLogitsWarper(0.9)])),
        dict(
            do_sample=True,
            logits_processor=LogitsProcessorList(
                [RepetitionPenaltyLogitsProcessor(1.3), TopKLogitsWarper(3)]
            ),
        ),
        dict(
            do_sample=True,
            logits_processor=LogitsProcessorList(
                [TemperatureLogitsWarper(1e-6), TopKLogitsWarper(3)]
            ),
        ),
        dict(
            do_sample=True,
            logits_processor=LogitsProcessorList([TopKLogitsWarper(MAX_SCREENED_TOP_K + 1)]),
        ),
    ],
    ids=[
        "value-changing processor",
        "output_logits",
        "sampling without processors",
        "top-p without top-k",
        "penalty before top-k",
        "extreme temperature",
        "very large top-k",
    ],
)
def test_other_steps_read_every_logit(kwargs):
    calls = []
    first_token(calls, **kwargs)
    assert calls == ["full"]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_head_logits_do_not_depend_on_the_other_rows(dtype):
    """Batch invariance of the host head, in full and screened: a row's logits are the same
    bits alone and among other rows, up to and past the kernels' row limit (screened: every
    logit selection can pick)."""
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(2000, 128, generator=generator).to(dtype)
    head = HostHead(weight, OpsProfile.for_host())
    row = torch.randn(1, 128, generator=generator).to(dtype)
    alone = head.next_token_logits(row)
    for rows in range(2, 2 * SKINNY_MAX_ROWS + 2):
        batch = torch.cat([torch.randn(rows - 1, 128, generator=generator).to(dtype), row])
        shared = head.next_token_logits(batch)
        assert torch.equal(shared.full()[-1], alone.full()[0]), rows
        for k in (1, 5):
            # What selection reads: the floor, and which tokens reach it with which logits.
            # (Below the floor a row may get exact logits another row asked for, or -inf.)
            (logits, floor), (logits_alone, floor_alone) = shared.near_top(k), alone.near_top(k)
            assert floor[-1] == floor_alone[0]
            reach = logits_alone[0] >= floor_alone[0]
            assert torch.equal(logits[-1] >= floor[-1], reach)
            assert torch.equal(logits[-1][reach], logits_alone[0][reach])
