"""Speculative decoding: drafted tokens checked by the verify program give exactly plain
greedy decoding's tokens, for every draft source, size, window and batch."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, TextIteratorStreamer
from transformers.generation import (
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.graphs import Gemma3Decoder
from optimum_gemma3.graphs.ops import OpsProfile
from optimum_gemma3.runtime import self_draft
from optimum_gemma3.runtime.logits import NextTokenLogits
from optimum_gemma3.runtime.self_draft import DraftHead
from optimum_gemma3.runtime.speculation import CheckingPolicy, GreedySelection
from optimum_gemma3.weights import load_weights
from tests.test_artifacts import exported  # noqa: F401  (session fixture)
from tests.test_kernels import needs_kernels
from tests.test_parity import host_profile_with_kernels
from tests.tiny_models import TEXT_SHAPES, load_reference, tiny_tokenizer

SPECULATION = dict(
    batch_size=2,
    sequence_length=96,
    context_encoding_buckets=[32],
    speculation_length=3,
    draft_quantization_dtype="int8",
    instance_type="cpu",
)
NEW_TOKENS = 40


@pytest.fixture(scope="module")
def speculative_exports(tiny_checkpoints, tmp_path_factory):
    """`(checkpoint, folder)` of a tiny size exported with a verify program, once."""
    exports = {}

    def get(name: str):
        if name not in exports:
            source = tiny_checkpoints(name)
            model = Gemma3NeuronModelForCausalLM.from_pretrained(source, export=True, **SPECULATION)
            exports[name] = source, model.save_pretrained(tmp_path_factory.mktemp(name) / name)
        return exports[name]

    return get


def repetitive_batch(vocab_size: int, seed: int = 0):
    """Two left-padded prompts past the sliding windows that repeat themselves, so prompt
    lookup finds drafts (and the random models reject most of them)."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(7, vocab_size, (12,), generator=generator)
    long = torch.cat([words, words, words[:5]])
    short = torch.cat([words[:8], words[:8], words[:5]])
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0], ids[1, -len(short) :] = long, short
    mask = (ids != 0).long()
    mask[0] = 1
    return ids, mask


def test_verify_positions_are_decode_steps_bit_for_bit(tiny_checkpoints):
    """The decoder's `k + 1`-token step against `k + 1` one-token steps from the same
    caches, across the wrapped ring of a sliding layer, fp32 and bf16: the same bits."""
    source = tiny_checkpoints("270m")
    config = AutoConfig.from_pretrained(source)
    for dtype in (torch.float32, torch.bfloat16):
        decoder = Gemma3Decoder(config, 2, 64, dtype, ops=host_profile_with_kernels())
        load_weights(decoder, source)
        ids, mask = repetitive_batch(512)
        new = torch.randint(7, 512, (2, 4), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            decoder.prefill(ids, mask)
            caches = {n: b.clone() for n, b in decoder.named_buffers() if ".cache." in n}
            start = mask.sum(-1)
            steps = [decoder.decode(new[:, j : j + 1], start + j, False) for j in range(4)]
            for name, buffer in decoder.named_buffers():
                if ".cache." in name:
                    buffer.copy_(caches[name])
            positions = start[:, None] + torch.arange(4)
            verified = decoder.decode(new, positions, False, every_token=True)
        assert torch.equal(verified, torch.stack(steps, dim=1)), dtype


@pytest.fixture
def always_check(monkeypatch):
    """Prompt-lookup drafts checked every round: the policy that skips unpromising ones
    decides by timings, and these tests need the verify path (and its rollbacks)."""
    monkeypatch.setattr(CheckingPolicy, "worth_checking", lambda self, lengths: True)


@pytest.mark.parametrize("name", TEXT_SHAPES)
def test_speculative_tokens_equal_plain_greedy(
    name, speculative_exports, always_check, monkeypatch
):
    """Prompt lookup (mostly rejected drafts: rollbacks) and an assistant that is the same
    model (every draft accepted) give plain greedy's tokens, which are transformers'."""
    source, folder = speculative_exports(name)
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    ids, mask = repetitive_batch(TEXT_SHAPES[name]["vocab_size"])
    greedy = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    plain = model.generate(ids, mask, **greedy)
    with torch.inference_mode():
        assert torch.equal(
            plain, load_reference(source).generate(ids, attention_mask=mask, **greedy)
        )

    assert torch.equal(model.generate(ids, mask, prompt_lookup_num_tokens=3, **greedy), plain)
    lookup = model.speculation_stats
    assert lookup.verify_calls and lookup.drafted > lookup.accepted  # drafts were rejected

    assistant = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    assert torch.equal(model.generate(ids, mask, assistant_model=assistant, **greedy), plain)
    stats = model.speculation_stats
    assert stats.accepted == stats.drafted > 0  # the same model drafts what it decodes

    # The model's int8 copy: the same tokens, and its drafts mostly right (a rollback or
    # cache copy gone wrong would leave it guessing from the wrong context).
    assert torch.equal(model.generate(ids, mask, self_draft=True, **greedy), plain)
    stats = model.speculation_stats
    assert stats.verify_calls and stats.acceptance_rate > 0.7, stats.acceptance_rate

    # A draft vocabulary smaller than the tiny vocabulary: drafts of the tokens outside
    # it come only from the request's own tokens, and the tokens stay plain greedy's.
    monkeypatch.setattr(self_draft, "DRAFT_VOCABULARY", (range(64),))
    assert torch.equal(model.generate(ids, mask, self_draft=True, **greedy), plain)
    assert model.speculation_stats.accepted > 0


@needs_kernels
def test_the_draft_head_covers_its_vocabulary_and_the_requests_tokens(monkeypatch):
    """The self-draft's head: int8 logits of its id ranges (clipped to the vocabulary) and
    of every token the request has shown it (prompts, then the target's tokens), -inf
    elsewhere; a new request forgets the last one's tokens."""
    monkeypatch.setattr(self_draft, "DRAFT_VOCABULARY", (range(100), range(290, 310)))
    generator = torch.Generator().manual_seed(0)
    q8, scales = torch.ops.optimum_gemma3.quantize_rows(torch.randn(300, 128, generator=generator))
    hidden = torch.randn(2, 128, generator=generator)
    every = torch.ops.optimum_gemma3.quantized_linear(hidden, q8, scales)

    def drafted(head: DraftHead) -> torch.Tensor:
        logits = head.logits(hidden)
        kept = logits[0] > -torch.inf
        assert torch.equal(logits[:, kept], every[:, kept])
        assert (logits[:, ~kept] == -torch.inf).all()
        return kept.nonzero().flatten()

    head = DraftHead(q8, scales)
    last = [*range(290, 300)]
    head.start(torch.tensor([5, 150, 150, 295, 7, 222]))
    assert drafted(head).tolist() == [*range(100), 150, 222, *last]
    head.add(torch.tensor([[200], [3]]))
    assert drafted(head).tolist() == [*range(100), 150, 200, 222, *last]
    head.start(torch.tensor([120]))
    assert drafted(head).tolist() == [*range(100), 120, *last]


def test_a_different_assistant_and_processors(speculative_exports, always_check):
    """A 270m-shaped assistant drafting for the 1b shape (same vocabulary, other weights),
    with a repetition penalty (selection through the processors, row by row)."""
    _, folder = speculative_exports("1b")
    _, assistant_folder = speculative_exports("270m")
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    assistant = Gemma3NeuronModelForCausalLM.from_pretrained(assistant_folder)
    ids, mask = repetitive_batch(512, seed=3)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.3)
    plain = model.generate(ids, mask, **options)
    assert torch.equal(model.generate(ids, mask, assistant_model=assistant, **options), plain)
    assert model.speculation_stats.verify_calls
    assert torch.equal(model.generate(ids, mask, prompt_lookup_num_tokens=2, **options), plain)


def screened_step(logits: torch.Tensor, floor: torch.Tensor) -> NextTokenLogits:
    """A step whose head returns `logits` (-inf outside its candidates) above `floor`."""
    return NextTokenLogits(lambda: logits, lambda k: (logits, floor))


def test_a_verify_calls_positions_are_chosen_at_once_as_one_by_one():
    """With only id-masking processors, `by_length` chooses every position of a verify
    call in one pass: the choices of position-by-position selection on each sequence,
    including where min_new_tokens masks the best candidate (EOS) and where it masks every
    candidate at or above the floor (then None: the caller goes step by step)."""
    eos, vocab = 1, 50
    processors = LogitsProcessorList(
        [
            MinNewTokensLengthLogitsProcessor(6, 3, eos_token_id=[eos]),
            SuppressTokensLogitsProcessor([7]),
        ]
    )
    select = GreedySelection(processors)
    assert (
        select.lengths_suffice
        and not GreedySelection(
            LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3)])
        ).lengths_suffice
    )
    generator = torch.Generator().manual_seed(0)
    steps, sequences = [], []
    for j in range(4):  # 2 rows of 6 + j tokens: EOS masked while fewer than 3 are new
        logits = torch.full((2, vocab), -torch.inf)
        logits[:, [eos, 7, 11, 20 + j]] = torch.randn(2, 4, generator=generator)
        logits[0, eos] = logits[0, 7] = 5.0  # row 0's best: EOS, then a suppressed token
        floor = torch.full((2,), -3.0)
        steps.append(screened_step(logits, floor))
        sequences.append([torch.zeros(1, 6 + j + row, dtype=torch.long) for row in range(2)])
    lengths = [[6 + j + row for row in range(2)] for j in range(4)]
    one_by_one = [select(step, seqs) for step, seqs in zip(steps, sequences, strict=True)]
    assert select.by_length(steps, lengths) == one_by_one
    assert one_by_one[0][0] != eos and one_by_one[3][0] == eos  # masked, then not

    only_eos = torch.full((1, vocab), -torch.inf)
    only_eos[0, eos] = 1.0  # the one candidate is masked: no exact score survives
    assert select.by_length([screened_step(only_eos, torch.tensor([0.5]))], [[6]]) is None


def test_min_new_tokens_and_suppressed_tokens_with_drafts(
    speculative_exports, always_check, monkeypatch
):
    """Id-masking processors, positions chosen at once: plain greedy's tokens."""
    chosen_at_once = []
    by_length = GreedySelection.by_length
    monkeypatch.setattr(
        GreedySelection,
        "by_length",
        lambda self, *args: chosen_at_once.append(by_length(self, *args)) or chosen_at_once[-1],
    )
    _, folder = speculative_exports("270m")
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    ids, mask = repetitive_batch(512, seed=5)
    options = dict(
        max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, suppress_tokens=[9]
    )
    plain = model.generate(ids, mask, **options)
    assert not (plain[:, ids.shape[1] :] == 9).any()
    assert torch.equal(model.generate(ids, mask, prompt_lookup_num_tokens=3, **options), plain)
    assert model.speculation_stats.verify_calls
    # Chosen at once, except in rounds where masking left a row no screened candidate
    # (EOS or token 9 on top: then position by position, as the screen's fallback).
    assert any(choices is not None for choices in chosen_at_once)


def test_eos_stop_strings_and_streamer(speculative_exports, real_270m, always_check):
    """Rows ending at their own EOS, a stop string, and a streamer (batch 1) see what plain
    greedy decoding gives them."""
    _, folder = speculative_exports("4b")
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    tokenizer = tiny_tokenizer(520)
    ids, mask = repetitive_batch(520, seed=4)
    free = model.generate(ids, mask, max_new_tokens=NEW_TOKENS)
    eos = [1, int(free[0, ids.shape[1] + 9])]  # a token row 0 produces mid-way
    options = dict(max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=0)
    plain = model.generate(ids, mask, **options)
    assert torch.equal(model.generate(ids, mask, prompt_lookup_num_tokens=3, **options), plain)

    # StopStringCriteria needs a subword tokenizer; the real one decodes tiny ids to text too.
    subwords = AutoTokenizer.from_pretrained(real_270m)
    stop = subwords.decode(free[1, ids.shape[1] + 5 : ids.shape[1] + 7])
    options = dict(max_new_tokens=NEW_TOKENS, stop_strings=stop, tokenizer=subwords)
    plain = model.generate(ids, mask, **options)
    assert torch.equal(model.generate(ids, mask, prompt_lookup_num_tokens=3, **options), plain)

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    one = model.generate(
        ids[:1], mask[:1], prompt_lookup_num_tokens=3, max_new_tokens=12, streamer=streamer
    )
    streamed = "".join(streamer)
    assert streamed.split() == tokenizer.decode(one[0, ids.shape[1] :]).split()


def test_what_speculation_cannot_do_is_refused(speculative_exports, tiny_checkpoints):
    _, folder = speculative_exports("270m")
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([[2, 9, 10, 9, 10]])
    with pytest.raises(ValueError, match="do_sample=True"):
        model.generate(ids, do_sample=True, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="assistant_model is a str"):
        model.generate(ids, assistant_model="google/gemma-3-270m")
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens and self_draft: choose one"):
        model.generate(ids, prompt_lookup_num_tokens=3, self_draft=True)
    _, other = speculative_exports("4b")
    with pytest.raises(ValueError, match="vocabulary of 520 tokens, this model 512"):
        model.generate(ids, assistant_model=Gemma3NeuronModelForCausalLM.from_pretrained(other))

    source = tiny_checkpoints("270m")
    with pytest.raises(ValueError, match="choose speculation_length <= 1"):
        Gemma3NeuronModelForCausalLM.from_pretrained(
            source, export=True, **{**SPECULATION, "batch_size": 4}
        )
    with pytest.raises(ValueError, match="tp_degree=1"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(
            source, **SPECULATION, tensor_parallel_size=2
        )
    with pytest.raises(ValueError, match="shortest KV cache"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(
            source, **{**SPECULATION, "speculation_length": 8}
        )
    with pytest.raises(ValueError, match="draft_quantization_dtype='int3' is not a self-draft"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(
            source, **{**SPECULATION, "draft_quantization_dtype": "int3"}
        )
    with pytest.raises(ValueError, match="set speculation_length=k"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(
            source, **{**SPECULATION, "speculation_length": 0}
        )


def test_a_model_without_verify_program_decodes_plainly(exported, caplog):  # noqa: F811
    """prompt_lookup_num_tokens on an export without speculation: a warning that says how
    to get it, and the same tokens."""
    _, model, _ = exported
    ids = torch.tensor([[2, 9, 10, 9, 10]])
    with caplog.at_level(logging.WARNING, logger="optimum_gemma3"):
        out = model.generate(ids, prompt_lookup_num_tokens=3, max_new_tokens=6)
    assert "speculation_length=k" in caplog.text
    assert torch.equal(out, model.generate(ids, max_new_tokens=6))


def test_cpu_kernels_are_needed_for_exact_verification(tiny_checkpoints, monkeypatch):
    from optimum_gemma3.compiler import export

    monkeypatch.setattr(export, "ops_profile_for", lambda target: OpsProfile())
    with pytest.raises(ValueError, match="needs the cpu backend's kernels"):
        Gemma3NeuronModelForCausalLM.from_pretrained(
            tiny_checkpoints("270m"), export=True, **SPECULATION
        )
