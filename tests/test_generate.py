"""optimum-neuron API and transformers generate()/pipeline semantics on a compiled tiny model.

Every comparison is against transformers 4.57 running the same checkpoint (fp32).
"""

from __future__ import annotations

import logging
from threading import Thread

import pytest
import torch
import transformers
from optimum.neuron import NeuronModelForCausalLM
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
    TextStreamer,
)

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.runtime.head import HostHead
from tests.test_artifacts import SHAPE, exported  # noqa: F401  (session fixture)
from tests.test_parity import left_padded_batch
from tests.tiny_models import load_reference, tiny_tokenizer


@pytest.fixture(scope="module")
def compiled(exported):  # noqa: F811
    source, model, folder = exported
    return source, model, load_reference(source)


def both_generate(compiled, ids, mask, seed=None, **kwargs):
    _, model, reference = compiled
    kwargs = {"pad_token_id": 0, **kwargs}
    if seed is not None:
        torch.manual_seed(seed)
    ours = model.generate(ids, attention_mask=mask, **kwargs)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        expected = reference.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return ours, expected


# -- optimum-neuron surface --------------------------------------------------------------


def test_auto_class_resolves_gemma3_without_the_sdk(compiled):
    _, model, _ = compiled
    for model_type in ("gemma3_text", "gemma3"):
        config = transformers.PretrainedConfig()
        config.model_type = model_type
        assert (
            NeuronModelForCausalLM._get_neuron_model_class(config) is Gemma3NeuronModelForCausalLM
        )
    assert isinstance(model, NeuronModelForCausalLM)


def test_auto_class_exports_loads_and_configures(exported, tmp_path):  # noqa: F811
    source, model, folder = exported
    config = NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    for field in (
        "batch_size",
        "sequence_length",
        "max_context_length",
        "tp_degree",
        "context_encoding_buckets",
        "torch_dtype",
        "target",
        "checkpoint_id",
    ):
        assert getattr(config, field) == getattr(model.neuron_config, field), field
    by_auto = NeuronModelForCausalLM.from_pretrained(
        source,
        export=True,
        batch_size=3,
        sequence_length=128,
        num_cores=1,
        auto_cast_type="fp32",
        context_encoding_buckets=[16, 32],
    )
    assert isinstance(by_auto, Gemma3NeuronModelForCausalLM)
    assert by_auto.neuron_config.tp_degree == 1 and by_auto.neuron_config.dtype_name == "float32"
    loaded = NeuronModelForCausalLM.from_pretrained(folder)
    exported_again = NeuronModelForCausalLM.export(source, config)
    ids, mask = left_padded_batch(520, seed=11)
    tokens = model.generate(ids, mask, max_new_tokens=12)
    for other in (by_auto, loaded, exported_again):
        assert torch.equal(other.generate(ids, mask, max_new_tokens=12), tokens)


def test_missing_instance_type_means_cpu_without_sdk(tiny_checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_gemma3"):
        config = NeuronModelForCausalLM.get_neuron_config(
            tiny_checkpoints("4b"), sequence_length=64
        )
    assert config.target == "cpu"
    assert "No Neuron SDK on this host: exporting for instance_type='cpu'" in caplog.text


def test_loading_with_export_options_but_no_export_is_refused(exported):  # noqa: F811
    _, _, folder = exported
    with pytest.raises(TypeError, match="pass export=True"):
        NeuronModelForCausalLM.from_pretrained(folder, batch_size=2)


def test_neuron_pipeline_needs_the_sdk_here():
    """optimum.neuron.pipeline imports the Neuron exporters: use transformers.pipeline."""
    with pytest.raises(ModuleNotFoundError):
        from optimum.neuron import pipeline  # noqa: F401


# -- generate() semantics ----------------------------------------------------------------


def test_greedy_uses_generation_config_and_kwargs(compiled):
    ids, mask = left_padded_batch(520, seed=12)
    ours, expected = both_generate(compiled, ids, mask, max_new_tokens=20, do_sample=False)
    assert torch.equal(ours, expected)
    config = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=1, pad_token_id=0)
    _, model, _ = compiled
    assert torch.equal(model.generate(ids, mask, generation_config=config), expected)


@pytest.mark.parametrize(
    "options",
    [
        dict(temperature=0.7),
        dict(top_k=20),
        dict(top_p=0.8, temperature=1.3),
        dict(top_k=50, top_p=0.95, temperature=0.9, repetition_penalty=1.2),
    ],
)
def test_sampling_is_seeded_and_matches_transformers(compiled, options, monkeypatch):
    """Top-k sampling (transformers' default top_k=50 included) draws from the screened
    head, unless a penalty comes before top-k; the draws are transformers' either way."""
    screened = []
    screen = HostHead.screened
    monkeypatch.setattr(HostHead, "screened", lambda *a: screened.append(1) or screen(*a))
    ids, mask = left_padded_batch(520, seed=13)
    ours, expected = both_generate(
        compiled, ids, mask, seed=42, do_sample=True, max_new_tokens=24, **options
    )
    assert torch.equal(ours, expected)
    assert len(screened) == (0 if "repetition_penalty" in options else 24)


def test_eos_and_min_new_tokens(compiled):
    ids, mask = left_padded_batch(520, seed=14)
    free, _ = both_generate(compiled, ids, mask, max_new_tokens=30)
    eos = int(free[1, ids.shape[1] + 3])  # row 1 emits it at its 4th new token
    ours, expected = both_generate(compiled, ids, mask, max_new_tokens=30, eos_token_id=eos)
    assert torch.equal(ours, expected)
    ours, expected = both_generate(
        compiled, ids, mask, max_new_tokens=30, eos_token_id=eos, min_new_tokens=10
    )
    assert torch.equal(ours, expected)


def test_max_length_and_clamping(compiled, caplog):
    ids, mask = left_padded_batch(520, seed=15)
    ours, expected = both_generate(compiled, ids, mask, max_length=40)
    assert torch.equal(ours, expected) and ours.shape[1] == 40
    _, model, _ = compiled
    with caplog.at_level(logging.WARNING, logger="optimum_gemma3"):
        out = model.generate(ids, mask, max_length=1000)
    assert "generating at most 105 tokens" in caplog.text  # 128 - the 23-token prompt
    assert out.shape[1] == ids.shape[1] + 105


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


class RecordsScores(StoppingCriteria):
    """Records what each call gets as `scores`: None, or the number of kept steps."""

    def __init__(self):
        self.seen = []

    def __call__(self, input_ids, scores, **kwargs):
        self.seen.append(None if scores is None else [tuple(s.shape) for s in scores])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize("output_scores", [False, True])
def test_stopping_criteria_get_the_scores_transformers_passes(compiled, output_scores):
    ids, mask = left_padded_batch(520, seed=17)
    ours, theirs = RecordsScores(), RecordsScores()
    _, model, reference = compiled
    options = dict(
        max_new_tokens=4, pad_token_id=0, return_dict_in_generate=True, output_scores=output_scores
    )
    model.generate(ids, attention_mask=mask, stopping_criteria=[ours], **options)
    with torch.inference_mode():
        reference.generate(
            input_ids=ids, attention_mask=mask, stopping_criteria=[theirs], **options
        )
    assert ours.seen == theirs.seen and len(ours.seen) == 4


def test_stopping_criteria_and_stop_strings(compiled, real_270m):
    ids, mask = left_padded_batch(520, seed=16)
    free, _ = both_generate(compiled, ids, mask, max_new_tokens=30)
    token = int(free[0, ids.shape[1] + 5])
    criteria = StoppingCriteriaList([StopAfterToken(token)])
    ours, expected = both_generate(
        compiled, ids, mask, max_new_tokens=30, stopping_criteria=criteria
    )
    assert torch.equal(ours, expected)

    # StopStringCriteria needs a subword tokenizer; the real one decodes tiny ids to text too.
    tokenizer = AutoTokenizer.from_pretrained(real_270m)
    stop = tokenizer.decode(free[2, ids.shape[1] + 6 : ids.shape[1] + 8])
    ours, expected = both_generate(
        compiled, ids, mask, max_new_tokens=30, stop_strings=[stop], tokenizer=tokenizer
    )
    assert torch.equal(ours, expected)
    assert (ours[2, -5:] == 0).all()  # row 2 stopped on the string, then padded


def test_streamers(compiled):
    _, model, _ = compiled
    tokenizer = tiny_tokenizer(520)
    inputs = tokenizer(["w9 w10 w11 w12 w13"], return_tensors="pt")
    printed = []

    class Recorder(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            printed.append(text)

    out = model.generate(
        **inputs, max_new_tokens=12, streamer=Recorder(tokenizer, skip_prompt=True)
    )
    assert "".join(printed).strip() == tokenizer.decode(out[0, 5:]).strip()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    thread = Thread(
        target=model.generate, kwargs=dict(**inputs, max_new_tokens=12, streamer=streamer)
    )
    thread.start()
    chunks = list(streamer)
    thread.join()
    assert "".join(chunks).strip() == tokenizer.decode(out[0, 5:]).strip()


def test_beam_search_is_refused(compiled):
    _, model, _ = compiled
    with pytest.raises(ValueError, match="num_beams=2: it belongs to beam search"):
        model.generate(torch.tensor([[2, 9, 10]]), num_beams=2)


# -- transformers pipelines --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(compiled):
    _, model, reference = compiled
    tokenizer = tiny_tokenizer(520)
    tokenizer.padding_side = "left"
    ours = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    theirs = transformers.pipeline("text-generation", model=reference, tokenizer=tokenizer)
    return ours, theirs


def test_pipeline_string_and_batched_list(pipelines):
    ours, theirs = pipelines
    kwargs = dict(max_new_tokens=16, do_sample=False)
    prompt = "w100 w200 w300 w7 w8 w9 w10 w11 w12 w13"
    assert ours(prompt, **kwargs) == theirs(prompt, **kwargs)
    prompts = [prompt, "w42", "w17 w18 w19"]
    assert ours(prompts, batch_size=3, **kwargs) == theirs(prompts, batch_size=3, **kwargs)


def test_pipeline_chat_messages_return_the_assistant_turn(pipelines):
    ours, theirs = pipelines
    messages = [{"role": "user", "content": "w50 w60 w70 w80 w90"}]
    result = ours(messages, max_new_tokens=12, do_sample=False)
    assert result == theirs(messages, max_new_tokens=12, do_sample=False)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
