"""Continuous batching: requests joining and leaving get the tokens they get alone.

Requests arrive at random steps into the compiled batch's free slots while others decode,
leave when they finish or are cancelled, and each returns exactly what `generate()`
returns for it alone: greedy tokens bit for bit, seeded samples draw for draw (with
`torch.manual_seed(seed)` before `generate()`). Also optimum-neuron's `forward()` entry
point over `seq_ids`.
"""

from __future__ import annotations

import random

import pytest
import torch

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.runtime.batching import ContinuousBatcher, SlotRequest
from tests.test_artifacts import exported  # noqa: F401  (session fixture)
from tests.test_batch_invariance import SHAPE as BATCH_8_SHAPE
from tests.test_kernels import needs_kernels

pytestmark = needs_kernels

# Per request: greedy, or sampling with a setting each (screened top-k, full-vocabulary
# top-p, a penalty that needs every logit), so one step mixes every selection path.
SETTINGS = [
    dict(do_sample=False),
    dict(do_sample=True, top_k=20, temperature=0.8),
    dict(do_sample=True, top_k=0, top_p=0.9),
    dict(do_sample=False, repetition_penalty=1.3),
]


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def two_layer(request, tiny_checkpoints):
    """The 2-layer tiny model at batch 8 (the programs test_batch_invariance compiles)."""
    source = tiny_checkpoints("2-layer")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        source, instance_type="cpu", torch_dtype=request.param, **BATCH_8_SHAPE
    )
    return Gemma3NeuronModelForCausalLM.export(source, config)


def random_requests(
    count: int, max_prompt: int, sequence_length: int, vocab: int, seed: int, max_new: int = 64
) -> list[dict]:
    """Random prompts (from <bos>) and budgets that fit `sequence_length`, settings in turn."""
    rng = random.Random(seed)
    specs = []
    for index in range(count):
        length = rng.randint(1, max_prompt)
        specs.append(
            dict(
                prompt=[2] + [rng.randrange(3, vocab) for _ in range(length - 1)],
                max_new_tokens=rng.randint(1, min(max_new, sequence_length - length)),
                seed=1000 + index,
                **SETTINGS[index % len(SETTINGS)],
            )
        )
    return specs


def alone(model, spec: dict) -> list[int]:
    """What `generate()` returns for the request by itself."""
    options = {k: v for k, v in spec.items() if k not in ("prompt", "seed")}
    torch.manual_seed(spec["seed"])
    out = model.generate(torch.tensor([spec["prompt"]]), **options)
    return out[0, len(spec["prompt"]) :].tolist()


def make_request(model, spec: dict) -> SlotRequest:
    options = {k: v for k, v in spec.items() if k != "prompt"}
    return SlotRequest(spec["prompt"], model.request_sampling(spec["prompt"], **options))


def run_staggered(model, requests: list[SlotRequest], seed: int, cancel: int | None = None):
    """Submit the requests at random steps (several at once sometimes), step until all end.
    Request `cancel` is cancelled three steps after it joins."""
    rng = random.Random(seed)
    pending = list(requests)
    batcher = ContinuousBatcher(model.runtime, prefills_per_step=rng.choice([1, 2]))
    steps, joined = 0, {}
    while pending or not batcher.idle:
        if pending and (batcher.idle or rng.random() < 0.4):
            for _ in range(rng.randint(1, 3)):
                if pending:
                    request = pending.pop(0)
                    joined[id(request)] = steps
                    batcher.submit(request)
        if cancel is not None and steps == joined.get(id(requests[cancel]), -9) + 3:
            requests[cancel].cancelled = True
        batcher.step()
        steps += 1
        assert len(batcher.active) <= model.runtime.batch_size
    assert batcher.idle and not batcher.active
    return batcher


def check_traffic(model, specs: list[dict], seed: int) -> None:
    expected = [alone(model, spec) for spec in specs]
    requests = [make_request(model, spec) for spec in specs]
    run_staggered(model, requests, seed)
    for spec, request, tokens in zip(specs, requests, expected, strict=True):
        assert request.tokens == tokens, spec
        assert request.finish_reason in ("stop", "length")


def test_two_layer_requests_join_and_leave_with_their_alone_tokens(two_layer):
    # 24 requests through 8 slots; prompts up to 32 tokens and generations through the
    # sliding window of 8 (sequence_length 48).
    specs = random_requests(24, max_prompt=32, sequence_length=48, vocab=512, seed=5)
    check_traffic(two_layer, specs, seed=7)


def test_4b_shape_requests_join_and_leave_with_their_alone_tokens(exported):  # noqa: F811
    _, model, _ = exported  # GQA, RoPE scaling, odd vocabulary; 3 slots, sequence 128
    specs = random_requests(10, max_prompt=32, sequence_length=128, vocab=500, seed=11)
    check_traffic(model, specs, seed=13)


def test_cancelled_request_frees_its_slot_and_disturbs_nobody(two_layer):
    specs = random_requests(12, max_prompt=30, sequence_length=48, vocab=512, seed=17)
    specs[2].update(max_new_tokens=40, prompt=specs[2]["prompt"][:5])
    expected = [alone(two_layer, spec) for spec in specs]
    requests = [make_request(two_layer, spec) for spec in specs]
    run_staggered(two_layer, requests, seed=19, cancel=2)
    assert requests[2].finish_reason == "cancelled"
    assert requests[2].tokens == expected[2][: len(requests[2].tokens)]
    assert len(requests[2].tokens) < 40
    for index, (request, tokens) in enumerate(zip(requests, expected, strict=True)):
        if index != 2:
            assert request.tokens == tokens


def test_stop_strings_and_eos_end_a_request_in_its_slot(two_layer):
    from tests.test_generate_options import stop_string_tokenizer

    tokenizer = stop_string_tokenizer()
    spec = random_requests(1, max_prompt=10, sequence_length=48, vocab=512, seed=23)[0]
    spec.update(do_sample=False, max_new_tokens=20, repetition_penalty=3.0)
    tokens = alone(two_layer, spec)
    end = next(j for j in range(2, 20) if tokens[j] not in tokens[:j])  # its first occurrence
    request = SlotRequest(
        spec["prompt"],
        two_layer.request_sampling(
            spec["prompt"],
            tokenizer=tokenizer,
            max_new_tokens=20,
            repetition_penalty=3.0,
            stop_strings=[tokenizer.decode(tokens[end])],
        ),
    )
    run_staggered(two_layer, [request], seed=1)
    assert request.finish_reason == "stop" and request.tokens == tokens[: end + 1]
    eos = SlotRequest(
        spec["prompt"],
        two_layer.request_sampling(
            spec["prompt"], repetition_penalty=3.0, eos_token_id=tokens[end]
        ),
    )
    run_staggered(two_layer, [eos], seed=1)
    assert eos.finish_reason == "stop" and eos.tokens == tokens[: end + 1]


def test_forward_runs_requests_in_their_seq_ids(two_layer):
    """optimum-neuron's entry point: right-padded prefill (vLLM's, pads at position 0) and
    left-padded (pads at position 1) into permuted cache rows, then decode over a subset."""
    model = two_layer
    specs = random_requests(3, max_prompt=20, sequence_length=48, vocab=512, seed=29)
    for spec in specs:
        spec.update(do_sample=False, max_new_tokens=8, min_new_tokens=8)
    expected = [alone(model, spec) for spec in specs]
    prompts = [spec["prompt"] for spec in specs]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    positions = torch.zeros(3, width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        if row == 2:  # left padded
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            positions[row] = 1
            positions[row, width - len(prompt) :] = torch.arange(len(prompt))
        else:
            ids[row, : len(prompt)] = torch.tensor(prompt)
            positions[row, : len(prompt)] = torch.arange(len(prompt))
    seq_ids = torch.tensor([5, 1, 3])
    logits = model.forward(ids, positions, seq_ids, torch.ones(3, 3))
    assert logits.shape == (3, 1, 512) and logits.dtype == torch.float32
    tokens = [[int(t)] for t in logits[:, 0].argmax(-1)]
    for step in range(7):
        rows = [0, 2] if step == 3 else [0, 1, 2]  # row 1 sits one step out, and resumes
        if step == 4:
            rows = [1]
        for_rows = torch.tensor(rows)
        last = torch.tensor([[tokens[r][-1]] for r in rows])
        at = torch.tensor([[len(prompts[r]) + len(tokens[r]) - 1] for r in rows])
        logits = model.forward(last, at, seq_ids[for_rows])
        for i, r in enumerate(rows):
            tokens[r].append(int(logits[i, 0].argmax()))
    for row, tokens_of_row in enumerate(tokens):
        assert tokens_of_row == expected[row][: len(tokens_of_row)], row


def test_forward_without_continuous_batching_covers_the_whole_batch(two_layer):
    model = two_layer
    model.neuron_config.continuous_batching = False
    try:
        with pytest.raises(ValueError, match="continuous_batching=False"):
            model.forward(torch.tensor([[2, 9, 10]]), torch.tensor([[0, 1, 2]]), torch.tensor([3]))
    finally:
        model.neuron_config.continuous_batching = True
    with pytest.raises(ValueError, match=r"sampling_params has shape \(2,\)"):
        model.forward(
            torch.tensor([[2, 9]]), torch.tensor([[0, 1]]), torch.tensor([0]), torch.ones(2)
        )


def test_continuous_batching_is_recorded_in_the_export_config(tiny_checkpoints, exported):  # noqa: F811
    from optimum_gemma3.artifact.checks import load_neuron_config

    source = tiny_checkpoints("2-layer")
    get = Gemma3NeuronModelForCausalLM.get_neuron_config
    assert get(source, instance_type="cpu", batch_size=4).continuous_batching is True
    assert get(source, instance_type="cpu", batch_size=1).continuous_batching is False
    off = get(source, instance_type="cpu", batch_size=4, continuous_batching=False)
    assert off.continuous_batching is False
    _, _, folder = exported  # batch 3
    assert load_neuron_config(folder).continuous_batching is True


@pytest.mark.real_model
def test_real_270m_requests_join_and_leave_with_their_alone_tokens(real_270m):
    """The real 270M (the 2-slot programs test_real_model compiles), greedy and sampled."""
    from tests.test_real_model import REAL_SHAPE

    config = Gemma3NeuronModelForCausalLM.get_neuron_config(real_270m, **REAL_SHAPE)
    model = Gemma3NeuronModelForCausalLM.export(real_270m, config)
    torch.set_num_threads(2)
    try:
        specs = random_requests(
            6, max_prompt=600, sequence_length=1024, vocab=262144, seed=31, max_new=12
        )
        check_traffic(model, specs, seed=37)
    finally:
        torch.set_num_threads(1)
