"""Every `GenerationConfig` field works with transformers' meaning or is refused by name,
and `return_dict_in_generate` returns transformers' scores and logits.

Compared with transformers 4.57 running the same tiny fp32 checkpoint.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import WatermarkingConfig
from transformers.generation import CompileConfig, GenerateDecoderOnlyOutput

from optimum_gemma3.integration.generation_options import (
    GENERATION_OPTIONS,
    Handling,
    generation_config_fields,
)
from optimum_gemma3.runtime.head import HostHead
from tests.test_artifacts import exported  # noqa: F401  (session fixture)
from tests.test_generate import both_generate, compiled  # noqa: F401  (module fixture)
from tests.test_parity import left_padded_batch
from tests.tiny_models import tiny_tokenizer

WIDTH = 23  # left_padded_batch's prompt width


def stop_string_tokenizer():
    """The tiny word-level tokenizer with the token `StopStringCriteria` prefixes every
    token with to learn how the vocabulary decodes."""
    tokenizer = tiny_tokenizer(520)
    tokenizer.add_tokens(["abcdef"])
    return tokenizer


def short(**kwargs) -> dict:
    return {"max_new_tokens": 4, **kwargs}


def sampled(**kwargs) -> dict:
    return short(do_sample=True, **kwargs)


# A non-default value of every field (with what it needs to act: sampling for warpers).
NON_DEFAULT = {
    "max_length": dict(max_length=WIDTH + 3),
    "max_new_tokens": dict(max_new_tokens=3),
    "min_length": short(min_length=WIDTH + 3, eos_token_id=[1, 5, 9]),
    "min_new_tokens": short(min_new_tokens=3, eos_token_id=[1, 5, 9]),
    "max_time": short(max_time=60.0),
    "stop_strings": short(stop_strings=["w292"], tokenizer=stop_string_tokenizer()),
    "eos_token_id": short(eos_token_id=9),
    "pad_token_id": short(pad_token_id=3),
    "bos_token_id": short(bos_token_id=7),
    "do_sample": sampled(),
    "temperature": sampled(temperature=0.7),
    "top_k": sampled(top_k=5),
    "top_p": sampled(top_p=0.8),
    "min_p": sampled(min_p=0.2),
    "typical_p": sampled(typical_p=0.8),
    "epsilon_cutoff": sampled(epsilon_cutoff=3e-3),
    "eta_cutoff": sampled(eta_cutoff=3e-3),
    "repetition_penalty": short(repetition_penalty=1.5),
    "encoder_repetition_penalty": short(encoder_repetition_penalty=1.5),
    "encoder_no_repeat_ngram_size": short(encoder_no_repeat_ngram_size=1),
    "no_repeat_ngram_size": short(no_repeat_ngram_size=1),
    "bad_words_ids": short(bad_words_ids=[[9], [10, 11]]),
    "sequence_bias": short(sequence_bias={(9,): 5.0}),
    "suppress_tokens": short(suppress_tokens=[9, 10]),
    "begin_suppress_tokens": short(begin_suppress_tokens=[9]),
    "forced_bos_token_id": short(forced_bos_token_id=9),
    "forced_eos_token_id": short(forced_eos_token_id=9),
    "renormalize_logits": sampled(renormalize_logits=True, top_k=5),
    "remove_invalid_values": short(remove_invalid_values=True),
    "exponential_decay_length_penalty": short(exponential_decay_length_penalty=(1, 2.0)),
    "watermarking_config": short(watermarking_config=WatermarkingConfig(bias=5.0)),
    "return_dict_in_generate": short(return_dict_in_generate=True),
    "output_scores": short(output_scores=True, return_dict_in_generate=True),
    "output_logits": short(output_logits=True, return_dict_in_generate=True),
    "output_attentions": short(output_attentions=True, return_dict_in_generate=True),
    "output_hidden_states": short(output_hidden_states=True, return_dict_in_generate=True),
    "use_cache": short(use_cache=False),
    "cache_implementation": short(cache_implementation="static"),
    "cache_config": short(cache_config={"nbits": 4}),
    "return_legacy_cache": short(return_legacy_cache=True),
    "prefill_chunk_size": short(prefill_chunk_size=8),
    "compile_config": short(compile_config=CompileConfig(fullgraph=False)),
    "disable_compile": short(disable_compile=True),
    "decoder_start_token_id": short(decoder_start_token_id=7),
    "num_beams": short(num_beams=2),
    "num_beam_groups": short(num_beam_groups=2),
    "diversity_penalty": short(diversity_penalty=0.5),
    "length_penalty": short(length_penalty=2.0),
    "early_stopping": short(early_stopping=True),
    "constraints": short(constraints=[[9]]),
    "force_words_ids": short(force_words_ids=[[9]]),
    "num_return_sequences": sampled(num_return_sequences=2),
    "penalty_alpha": short(penalty_alpha=0.6),
    "low_memory": short(low_memory=True),
    "dola_layers": short(dola_layers="low"),
    "guidance_scale": short(guidance_scale=1.5),
    "token_healing": short(token_healing=True),
    "is_assistant": short(is_assistant=True),
    "num_assistant_tokens": short(num_assistant_tokens=5),
    "num_assistant_tokens_schedule": short(num_assistant_tokens_schedule="heuristic"),
    "assistant_confidence_threshold": short(assistant_confidence_threshold=0.2),
    "prompt_lookup_num_tokens": short(prompt_lookup_num_tokens=10),
    "max_matching_ngram_size": short(max_matching_ngram_size=2),
    "assistant_early_exit": short(assistant_early_exit=2),
    "assistant_lookbehind": short(assistant_lookbehind=5),
    "target_lookbehind": short(target_lookbehind=5),
    "transformers_version": short(transformers_version="4.50.0"),
    "_from_model_config": short(_from_model_config=True),
    "_commit_hash": short(_commit_hash="0" * 40),
    "_original_object_hash": short(_original_object_hash=1),
}


# Speculative decoding's options: greedy decoding's tokens with or without them.
DRAFT_OPTIONS = {"prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens"}


def sequences(output) -> torch.Tensor:
    return output.sequences if isinstance(output, GenerateDecoderOnlyOutput) else output


def test_the_table_classifies_every_generation_config_field_once():
    """A field a later transformers adds fails here until it is classified (and meanwhile
    generate() refuses it when set)."""
    assert set(GENERATION_OPTIONS) == generation_config_fields()
    assert set(NON_DEFAULT) == generation_config_fields()


@pytest.mark.parametrize("field", sorted(generation_config_fields()))
def test_every_option_works_as_in_transformers_or_is_refused_by_name(compiled, field):  # noqa: F811
    kwargs = {"pad_token_id": 0, **NON_DEFAULT[field]}
    ids, mask = left_padded_batch(520, seed=30)
    if GENERATION_OPTIONS[field].handling is Handling.REFUSED:
        _, model, _ = compiled
        with pytest.raises(ValueError, match=rf"\b{re.escape(field)}\b"):
            model.generate(ids, mask, **kwargs)
        return
    _, model, reference = compiled
    torch.manual_seed(5)
    ours = model.generate(ids, mask, **kwargs)
    if GENERATION_OPTIONS[field].handling is Handling.IGNORED or field in DRAFT_OPTIONS:
        # Drafts change the speed, never the tokens (and transformers' assisted decoding
        # takes one row only): transformers' tokens without them.
        # An ignored option changes nothing: transformers' tokens without it (where
        # transformers gives others with it, as prefill_chunk_size does on left-padded
        # rows, that is not what the option is for).
        kwargs = {name: value for name, value in kwargs.items() if name != field}
    torch.manual_seed(5)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(sequences(ours), sequences(expected))


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(cache_implementation="quantized"), "cache_implementation='quantized'"),
        (dict(past_key_values=None, position_ids=None), "['past_key_values', 'position_ids']"),
        (dict(assistant_model="google/gemma-3-270m"), "assistant_model is a str"),
        (dict(validate=1), "['validate']"),  # a GenerationConfig method, not a field
        (dict(num_beams=2, penalty_alpha=0.5), "num_beams=2: it belongs to beam search"),
    ],
)
def test_refusals_name_what_is_refused(compiled, kwargs, named):  # noqa: F811
    _, model, _ = compiled
    with pytest.raises(ValueError, match=re.escape(named)):
        model.generate(torch.tensor([[2, 9, 10]]), max_new_tokens=2, **kwargs)


def test_a_field_unknown_to_the_table_is_refused_unless_at_its_default(compiled):  # noqa: F811
    _, model, _ = compiled
    ids = torch.tensor([[2, 9, 10]])
    config = model.generation_config.__class__(max_new_tokens=2, pad_token_id=0)
    config.some_future_option = True
    with pytest.raises(ValueError, match="some_future_option=True: not a generation option"):
        model.generate(ids, generation_config=config)
    config = model.generation_config.__class__(max_new_tokens=2, pad_token_id=0, guidance_scale=1)
    assert model.generate(ids, generation_config=config).shape == (1, 5)  # harmless value


@pytest.mark.parametrize(
    "options",
    [
        dict(repetition_penalty=1.3),
        dict(no_repeat_ngram_size=2),
        dict(bad_words_ids=[[9], [10, 11]], suppress_tokens=[12]),
        dict(exponential_decay_length_penalty=(3, 1.5), eos_token_id=[1, 9]),
        dict(forced_eos_token_id=9, max_new_tokens=10),
        dict(sequence_bias={(9,): 4.0, (10, 11): -4.0}, begin_suppress_tokens=[12]),
        dict(do_sample=True, min_p=0.1, seed=7),
        dict(do_sample=True, typical_p=0.9, temperature=1.5, seed=8),
        dict(do_sample=True, epsilon_cutoff=1e-3, renormalize_logits=True, seed=9),
    ],
)
def test_processor_options_give_transformers_tokens(compiled, options):  # noqa: F811
    options = {"max_new_tokens": 20, **options}
    ids, mask = left_padded_batch(520, seed=31)
    ours, expected = both_generate(compiled, ids, mask, **options)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("sampling", [dict(do_sample=False), dict(do_sample=True, seed=3)])
def test_scores_and_logits_match_transformers(compiled, sampling, monkeypatch):  # noqa: F811
    """Per-step raw logits and processed scores as transformers returns them; with either
    asked for, no step uses the screened head (which leaves most logits at -inf)."""
    screened = []
    screen = HostHead.screened
    monkeypatch.setattr(HostHead, "screened", lambda *a: screened.append(1) or screen(*a))
    ids, mask = left_padded_batch(520, seed=32)
    options = dict(
        max_new_tokens=12,
        top_k=20,
        temperature=0.8,
        repetition_penalty=1.1,
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        **sampling,
    )
    ours, expected = both_generate(compiled, ids, mask, **options)
    assert isinstance(ours, GenerateDecoderOnlyOutput)
    assert torch.equal(ours.sequences, expected.sequences)
    assert len(ours.scores) == len(expected.scores) == len(ours.logits) == 12
    assert (ours.attentions, ours.hidden_states, ours.past_key_values) == (None, None, None)
    # Tight, not bitwise: the compiled programs fuse and order the fp32 sums differently
    # from transformers' eager modules (tests/test_parity.py bounds the logits the same way).
    for mine, theirs in zip(
        ours.logits + ours.scores, expected.logits + expected.scores, strict=True
    ):
        assert mine.shape == theirs.shape == (3, 520) and mine.dtype == torch.float32
        assert torch.equal(mine.isinf(), theirs.isinf())
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert not screened


def test_scores_or_logits_alone_and_without_return_dict(compiled):  # noqa: F811
    _, model, _ = compiled
    ids, mask = left_padded_batch(520, seed=33)
    tokens = model.generate(ids, mask, max_new_tokens=6)
    only_scores = model.generate(
        ids, mask, max_new_tokens=6, return_dict_in_generate=True, output_scores=True
    )
    assert torch.equal(only_scores.sequences, tokens)
    assert only_scores.logits is None and len(only_scores.scores) == 6
    only_logits = model.generate(
        ids, mask, max_new_tokens=6, return_dict_in_generate=True, output_logits=True
    )
    assert only_logits.scores is None and len(only_logits.logits) == 6
    # Greedy with no processor: the scores are the raw logits.
    for scores, logits in zip(only_scores.scores, only_logits.logits, strict=True):
        assert torch.equal(scores, logits)
    plain = model.generate(ids, mask, max_new_tokens=6, output_scores=True, output_logits=True)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, tokens)


def test_default_length_and_mask_are_prepared_as_in_transformers(compiled):  # noqa: F811
    """No max_new_tokens: transformers' default of 20 new tokens (not `max_length=20`
    counted from a 23-token prompt); no attention_mask: inferred from the left padding."""
    ids, _ = left_padded_batch(520, seed=34)
    _, model, reference = compiled
    ours = model.generate(ids, pad_token_id=0)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, pad_token_id=0)
    assert ours.shape == (3, WIDTH + 20)
    assert torch.equal(ours, expected)
