"""Config reading and checkpoint loading: what is accepted and how refusals read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, Gemma3TextConfig, LlamaConfig

from optimum_gemma3.graphs import FULL, SLIDING, Gemma3Decoder, text_config
from optimum_gemma3.graphs.config import rope_frequencies
from optimum_gemma3.weights import decoder_name, load_weights
from tests.tiny_models import make_config


def test_multimodal_config_yields_text_config_with_defaults():
    config = text_config(make_config("4b-multimodal"))
    assert isinstance(config, Gemma3TextConfig)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert config.num_key_value_heads == 4


def test_rope_scaling_applies_to_full_layers_only():
    config = text_config(make_config("4b"))
    local, local_scale = rope_frequencies(config, SLIDING)
    full, full_scale = rope_frequencies(config, FULL)
    dim = config.head_dim
    expected_local = 1.0 / 10_000.0 ** (torch.arange(0, dim, 2).float() / dim)
    expected_full = 1.0 / 1_000_000.0 ** (torch.arange(0, dim, 2).float() / dim) / 8.0
    torch.testing.assert_close(local, expected_local, rtol=0, atol=0)
    torch.testing.assert_close(full, expected_full, rtol=0, atol=0)
    assert local_scale == full_scale == 1.0


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="Unsupported model_type 'llama'"):
        text_config(LlamaConfig())


def test_sequence_dependent_rope_is_refused():
    config = text_config(make_config("270m"))
    config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    with pytest.raises(ValueError, match="'dynamic' depends on the sequence length"):
        Gemma3Decoder(config, 1, 32)


def test_sliding_layers_get_window_sized_caches():
    config = text_config(make_config("4b"))
    decoder = Gemma3Decoder(config, batch_size=2, sequence_length=64)
    lengths = {layer.layer_type: layer.self_attn.cache.length for layer in decoder.layers}
    assert lengths == {SLIDING: config.sliding_window, FULL: 64}
    # Weights and caches are separate: the state dict holds weights only.
    assert not any("cache" in key for key in decoder.state_dict())


@pytest.mark.parametrize(
    "name, expected",
    [
        ("model.layers.0.mlp.up_proj.weight", "layers.0.mlp.up_proj.weight"),
        ("language_model.model.norm.weight", "norm.weight"),
        ("model.language_model.embed_tokens.weight", "embed_tokens.weight"),
        ("model.vision_tower.vision_model.post_layernorm.weight", None),
        ("multi_modal_projector.mm_input_projection_weight", None),
        ("lm_head.weight", None),
    ],
)
def test_checkpoint_names(name, expected):
    assert decoder_name(name, tied=True) == expected


def test_missing_tensor_is_named(tiny_checkpoints, tmp_path):
    source = tiny_checkpoints("270m")
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.3.self_attn.k_norm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    config = AutoConfig.from_pretrained(source)
    with pytest.raises(ValueError, match=r"missing \[.layers.3.self_attn.k_norm.weight.\]"):
        load_weights(Gemma3Decoder(config, 1, 32), tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
    config = make_config("270m")
    with pytest.raises(FileNotFoundError, match="safetensors checkpoints only"):
        load_weights(Gemma3Decoder(config, 1, 32), tmp_path)


def test_sharded_checkpoint_with_missing_shard_is_named(tmp_path):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_weights(Gemma3Decoder(make_config("270m"), 1, 32), tmp_path)
