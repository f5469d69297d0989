"""Routing through optimum-neuron's auto class: non-Gemma-3 models, and which Gemma-3 compiles.

No Neuron SDK is installed or faked here. "A host with the SDK" is the SDK check in
`optimum_gemma3.integration.registry` monkeypatched to answer yes; "optimum-neuron ships its own
Gemma-3" is a plain class put in optimum-neuron's model registry under the Gemma-3 keys
before `register()` runs, as optimum-neuron's `auto_models` does on SDK hosts.
"""

from __future__ import annotations

import importlib
import inspect
import json
import logging

import pytest
from optimum.neuron import NeuronModelForCausalLM
from optimum.neuron.models import auto_model
from optimum.neuron.models.inference import modeling_utils
from transformers import LlamaConfig, LlamaForCausalLM

import optimum_gemma3
from optimum_gemma3 import (
    Gemma3NeuronConfig,
    Gemma3NeuronModelForCausalLM,
    Gemma3NeuronModelForImageTextToText,
)
from optimum_gemma3.artifact.files import NEURON_CONFIG_NAME
from optimum_gemma3.constants import IMPLEMENTATION_ENV, MODEL_TYPES, REGISTRY_MODE, TASK
from optimum_gemma3.integration import registry as integration

GEMMA3_KEYS = [(model_type, TASK, REGISTRY_MODE) for model_type in MODEL_TYPES]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    """A tiny random Llama: any architecture optimum-gemma3 does not compile."""
    folder = tmp_path_factory.mktemp("llama")
    config = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture
def llama_compiled(llama_checkpoint, tmp_path):
    """A folder shaped like optimum-neuron's compiled Llama (config plus neuron_config)."""
    folder = tmp_path / "llama-neuron"
    LlamaConfig.from_pretrained(llama_checkpoint).save_pretrained(folder)
    (folder / NEURON_CONFIG_NAME).write_text(json.dumps({"batch_size": 1}))
    return folder


def other_model_calls(llama_checkpoint, llama_compiled):
    config = LlamaConfig.from_pretrained(llama_checkpoint)
    return {
        "export": lambda: NeuronModelForCausalLM.from_pretrained(
            llama_checkpoint, export=True, instance_type="cpu"
        ),
        "get_neuron_config": lambda: NeuronModelForCausalLM.get_neuron_config(
            llama_checkpoint, instance_type="cpu"
        ),
        "load compiled": lambda: NeuronModelForCausalLM.from_pretrained(llama_compiled),
        "lookup": lambda: NeuronModelForCausalLM._get_neuron_model_class(config),
        "export classmethod": lambda: NeuronModelForCausalLM.export(llama_checkpoint, None),
    }


CALLS = ["export", "get_neuron_config", "load compiled", "lookup", "export classmethod"]


@pytest.mark.parametrize("call", CALLS)
def test_other_models_without_the_sdk_are_refused_by_name(llama_checkpoint, llama_compiled, call):
    with pytest.raises(integration.UnsupportedModelError) as error:
        other_model_calls(llama_checkpoint, llama_compiled)[call]()
    message = str(error.value)
    assert "'llama' model" in message
    assert "optimum-gemma3 compiles only Gemma-3 (gemma3_text and gemma3)" in message
    assert "needs the AWS Neuron SDK" in message
    assert "Inferentia/Trainium host" in message and "pip.repos.neuron.amazonaws.com" in message


@pytest.mark.parametrize("call", ["export", "load compiled", "lookup"])
def test_other_models_with_the_sdk_go_to_optimum_neuron_unchanged(
    llama_checkpoint, llama_compiled, monkeypatch, call
):
    """With the SDK, optimum-neuron's own lookup runs: here it really imports its NxD models,
    which fail on the SDK this host lacks (proof the call reached optimum-neuron)."""
    monkeypatch.setattr(integration, "missing_sdk_packages", lambda: [])
    with pytest.raises(ModuleNotFoundError, match="neuronx_distributed"):
        other_model_calls(llama_checkpoint, llama_compiled)[call]()


# -- which Gemma-3 compiles -------------------------------------------------------------------


class OptimumNeuronGemma3:
    """Stands in the registry for optimum-neuron's own Gemma-3 class; records its calls."""

    calls: list[tuple[str, str, dict]] = []

    @classmethod
    def get_neuron_config(cls, model_id, **kwargs):
        cls.calls.append(("get_neuron_config", str(model_id), kwargs))
        return "optimum-neuron's config"

    @classmethod
    def from_pretrained(cls, model_id, **kwargs):
        cls.calls.append(("from_pretrained", str(model_id), kwargs))
        return "optimum-neuron's model"


@pytest.fixture
def optimum_neuron_gemma3(monkeypatch):
    """optimum-neuron's registry holding its own Gemma-3 before `register()` runs."""
    registry = auto_model._REGISTERED_NEURON_MODELS
    for key in GEMMA3_KEYS:
        monkeypatch.setitem(registry, key, OptimumNeuronGemma3)  # restored after the test
    integration.register(Gemma3NeuronModelForCausalLM, Gemma3NeuronModelForImageTextToText)
    OptimumNeuronGemma3.calls = []
    return OptimumNeuronGemma3


@pytest.fixture
def gemma3(tiny_checkpoints):
    return tiny_checkpoints("4b")


def choice_lines(caplog) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == integration.__name__]


def test_register_keeps_optimum_neurons_own_entry(optimum_neuron_gemma3):
    for key in GEMMA3_KEYS:
        assert auto_model._REGISTERED_NEURON_MODELS[key] is optimum_neuron_gemma3
    config = LlamaConfig()
    for model_type in MODEL_TYPES:
        config.model_type = model_type
        assert (
            NeuronModelForCausalLM._get_neuron_model_class(config) is Gemma3NeuronModelForCausalLM
        )
        assert integration.optimum_neuron_class(model_type) is optimum_neuron_gemma3


def test_neuron_target_defaults_to_optimum_gemma3_and_says_how_to_switch(
    optimum_neuron_gemma3, gemma3, caplog
):
    with caplog.at_level(logging.INFO, logger="optimum_gemma3"):
        config = NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="trn1", sequence_length=64
        )
    assert isinstance(config, Gemma3NeuronConfig) and config.target == "trn1"
    assert optimum_neuron_gemma3.calls == []
    [line] = choice_lines(caplog)
    assert line.levelno == logging.WARNING
    message = line.getMessage()
    assert "optimum-gemma3 compiles this gemma3_text model for trn1 (the default)" in message
    assert "implementation='optimum-neuron'" in message
    assert "--implementation optimum-neuron" in message
    assert f"{IMPLEMENTATION_ENV}=optimum-neuron" in message


def test_option_routes_to_optimum_neurons_gemma3(optimum_neuron_gemma3, gemma3, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_gemma3"):
        config = NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="trn1", sequence_length=64, implementation="optimum-neuron"
        )
        model = NeuronModelForCausalLM.from_pretrained(
            gemma3, export=True, instance_type="inf2", implementation="optimum-neuron"
        )
    assert (config, model) == ("optimum-neuron's config", "optimum-neuron's model")
    assert optimum_neuron_gemma3.calls == [
        ("get_neuron_config", str(gemma3), {"instance_type": "trn1", "sequence_length": 64}),
        ("from_pretrained", str(gemma3), {"export": True, "instance_type": "inf2"}),
    ]
    lines = choice_lines(caplog)
    assert [line.levelno for line in lines] == [logging.INFO, logging.INFO]
    assert "optimum-neuron compiles this gemma3_text model for inf2" in lines[1].getMessage()
    assert "implementation='optimum-gemma3'" in lines[1].getMessage()


def test_environment_variable_routes_to_optimum_neurons_gemma3(
    optimum_neuron_gemma3, gemma3, monkeypatch
):
    monkeypatch.setenv(IMPLEMENTATION_ENV, "optimum-neuron")
    assert (
        NeuronModelForCausalLM.get_neuron_config(gemma3, instance_type="trn1")
        == "optimum-neuron's config"
    )
    # The option wins over the environment.
    config = NeuronModelForCausalLM.get_neuron_config(
        gemma3, instance_type="trn1", sequence_length=64, implementation="optimum-gemma3"
    )
    assert isinstance(config, Gemma3NeuronConfig)


def test_cpu_target_always_uses_optimum_gemma3(optimum_neuron_gemma3, gemma3, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_gemma3"):
        config = NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="cpu", sequence_length=64
        )
    assert isinstance(config, Gemma3NeuronConfig) and config.target == "cpu"
    assert choice_lines(caplog) == [] and optimum_neuron_gemma3.calls == []
    with pytest.raises(ValueError, match="compiles for Neuron instances only"):
        NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="cpu", implementation="optimum-neuron"
        )


def test_without_optimum_neurons_gemma3_ours_compiles_silently(gemma3, caplog):
    with caplog.at_level(logging.INFO, logger="optimum_gemma3"):
        config = NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="trn1", sequence_length=64
        )
    assert isinstance(config, Gemma3NeuronConfig)
    assert choice_lines(caplog) == []
    with pytest.raises(ValueError, match="registers no 'gemma3_text' model here"):
        NeuronModelForCausalLM.get_neuron_config(
            gemma3, instance_type="trn1", implementation="optimum-neuron"
        )


def test_unknown_implementation_is_refused_with_the_choices(gemma3, monkeypatch):
    with pytest.raises(ValueError, match="Unknown implementation='nxd': expected one of"):
        NeuronModelForCausalLM.get_neuron_config(gemma3, implementation="nxd")
    monkeypatch.setenv(IMPLEMENTATION_ENV, "nxd")
    with pytest.raises(ValueError, match=f"Unknown {IMPLEMENTATION_ENV}=nxd"):
        NeuronModelForCausalLM.get_neuron_config(gemma3)


def test_our_class_refuses_optimum_neurons_implementation(gemma3):
    with pytest.raises(ValueError, match="use the auto class"):
        Gemma3NeuronModelForCausalLM.get_neuron_config(gemma3, implementation="optimum-neuron")


def test_compiled_folder_loads_with_the_implementation_that_wrote_it(
    optimum_neuron_gemma3, gemma3, tmp_path, monkeypatch
):
    loaded_by_us = []
    monkeypatch.setattr(
        Gemma3NeuronModelForCausalLM,
        "from_pretrained",
        classmethod(lambda cls, model_id, **kwargs: loaded_by_us.append(str(model_id))),
    )
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for folder, recorded in ((ours, {"optimum_gemma3_version": "0.1"}), (theirs, {})):
        folder.mkdir()
        (folder / "config.json").write_text((gemma3 / "config.json").read_text())
        (folder / NEURON_CONFIG_NAME).write_text(json.dumps(recorded))
        NeuronModelForCausalLM.from_pretrained(folder)
    assert loaded_by_us == [str(ours)]
    assert optimum_neuron_gemma3.calls == [("from_pretrained", str(theirs), {})]


# -- what the layer relies on ---------------------------------------------------------------


def test_compatibility_layer_assumptions_hold():
    """Fails when an optimum-neuron release moves what integration/registry.py wraps."""
    assert callable(auto_model.register_neuron_model)
    assert isinstance(auto_model._REGISTERED_NEURON_MODELS, dict)
    for key in GEMMA3_KEYS:
        assert auto_model._REGISTERED_NEURON_MODELS[key] is Gemma3NeuronModelForCausalLM
    assert getattr(modeling_utils.get_neuron_model_class, "_optimum_gemma3", False)
    assert list(inspect.signature(modeling_utils.get_neuron_model_class).parameters) == [
        "model_type",
        "task",
        "mode",
    ]
    source = inspect.getsource(modeling_utils.NeuronPreTrainedModel._get_neuron_model_class)
    assert "get_neuron_model_class(" in source
    assert NeuronModelForCausalLM.task == TASK
    for name in ("get_neuron_config", "from_pretrained"):
        routed = getattr(modeling_utils.NeuronModelForCausalLM, name).__func__
        assert getattr(routed, "_optimum_gemma3", False), name
        assert "AutoConfig.from_pretrained" in inspect.getsource(routed.__wrapped__), name


def test_registering_twice_does_not_stack_wrappers():
    lookup = modeling_utils.get_neuron_model_class
    importlib.reload(optimum_gemma3.integration.registry)
    optimum_gemma3.integration.registry.register(
        Gemma3NeuronModelForCausalLM, Gemma3NeuronModelForImageTextToText
    )
    assert modeling_utils.get_neuron_model_class is lookup
    assert not getattr(lookup.__wrapped__, "_optimum_gemma3", False)


def test_the_auto_class_export_classmethod_compiles_gemma3(tiny_checkpoints):
    """optimum-neuron's two-step export: `get_neuron_config`, then `export`, both on the
    auto class, reach this package's class (the same shape as test_artifacts' export, so
    the compile cache serves it)."""
    from tests.test_artifacts import SHAPE

    source = tiny_checkpoints("4b")
    neuron_config = NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    model = NeuronModelForCausalLM.export(source, neuron_config, load_weights=True)
    assert isinstance(model, Gemma3NeuronModelForCausalLM)
    assert model.neuron_config.batch_size == SHAPE["batch_size"]
