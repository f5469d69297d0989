"""Checkpoint safetensors -> the decoder's parameters.

Gemma-3 checkpoints name the text decoder three ways:
- `model.*`                  (270m, 1b: `Gemma3ForCausalLM`)
- `language_model.model.*`   (original 4b/12b/27b multimodal checkpoints)
- `model.language_model.*`   (multimodal checkpoints re-saved by transformers >= 4.52)
Vision tower and projector weights go to the vision encoder (`vision_state_dict`), or
are dropped for a text-only export; the head is tied to the embedding, so a stored
`lm_head.weight` is ignored unless the config unties it. Only safetensors are read: a
downloaded pickle is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from .graphs import Gemma3Decoder
from .graphs.parallel import shard_state_dict

logger = logging.getLogger(__name__)

DECODER_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.")
SKIPPED_PREFIXES = VISION_PREFIXES + tuple(f"model.{prefix}" for prefix in VISION_PREFIXES)
# SigLIP's attention-pooling head: saved with the vision tower, unused by Gemma-3.
UNUSED_VISION_PREFIX = "vision_tower.vision_model.head."

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint folder (single file or sharded with an index)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [model_dir / shard for shard in shards]
    elif (model_dir / SAFE_WEIGHTS_NAME).is_file():
        files = [model_dir / SAFE_WEIGHTS_NAME]
    else:
        raise FileNotFoundError(
            f"No {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {model_dir}. optimum-gemma3 "
            "loads safetensors checkpoints only; convert a .bin checkpoint with "
            "transformers' save_pretrained(safe_serialization=True) first."
        )
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"Checkpoint shards listed in the index are missing: {missing}")
    return files


def decoder_name(checkpoint_name: str, tied: bool) -> str | None:
    """Map a checkpoint tensor name to the decoder's parameter name, or None to skip it."""
    if checkpoint_name in HEAD_NAMES:
        return None if tied else "lm_head.weight"
    if checkpoint_name.startswith(SKIPPED_PREFIXES):
        return None
    for prefix in DECODER_PREFIXES:
        if checkpoint_name.startswith(prefix):
            return checkpoint_name[len(prefix) :]
    return None


def load_decoder_state_dict(
    model_dir: str | os.PathLike, dtype: torch.dtype, tied: bool = True
) -> dict[str, torch.Tensor]:
    """Read the text decoder's tensors from a checkpoint folder, renamed and cast to `dtype`."""
    state_dict: dict[str, torch.Tensor] = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                target = decoder_name(name, tied)
                if target is not None:
                    state_dict[target] = f.get_tensor(name).to(dtype)
    return state_dict


def vision_name(checkpoint_name: str) -> str | None:
    """Map a checkpoint tensor name to the vision encoder's parameter name, or None."""
    name = checkpoint_name.removeprefix("model.")
    if not name.startswith(VISION_PREFIXES) or name.startswith(UNUSED_VISION_PREFIX):
        return None
    return name


def vision_state_dict(
    model_dir: str | os.PathLike, encoder: torch.nn.Module, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The vision tower and projector tensors of a multimodal checkpoint, renamed, cast to
    `dtype` and checked against `encoder` (a `Gemma3VisionEncoder`, e.g. its skeleton)."""
    state_dict = {}
    for path in safetensors_files(model_dir):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                target = vision_name(name)
                if target is not None:
                    state_dict[target] = f.get_tensor(name).to(dtype).contiguous()
    check_tensors(state_dict, encoder, model_dir)
    return state_dict


def check_tensors(
    tensors: dict[str, torch.Tensor], decoder: torch.nn.Module, source: str | os.PathLike
) -> None:
    """Refuse weights whose names, shapes or dtypes differ from the decoder's parameters."""
    expected = {n: (tuple(p.shape), p.dtype) for n, p in decoder.named_parameters()}
    found = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise ValueError(
            f"Weights in {source} do not match the Gemma-3 decoder built from its config: "
            f"missing {missing[:8]}, unexpected {unexpected[:8]}, wrong shape or dtype "
            f"{[(n, found[n], expected[n]) for n in wrong[:4]]}."
        )


def load_weights(decoder: torch.nn.Module, model_dir: str | os.PathLike) -> None:
    """Load a checkpoint into a `Gemma3Decoder`, failing on any missing or unexpected tensor."""
    state_dict = load_decoder_state_dict(
        model_dir, decoder.dtype, tied=decoder.config.tie_word_embeddings
    )
    check_tensors(state_dict, decoder, model_dir)
    decoder.load_state_dict(state_dict)


def resolve_checkpoint(
    model_id: str | Path, revision: str | None = None, token: str | bool | None = None
) -> Path:
    """A local folder as is; a Hub id through the HF cache (safetensors and configs only)."""
    if Path(model_id).is_dir():
        return Path(model_id)
    return Path(
        snapshot_download(
            str(model_id), revision=revision, token=token, allow_patterns=CHECKPOINT_PATTERNS
        )
    )


def rank_state_dicts(checkpoint: Path, text, neuron_config) -> list[dict[str, torch.Tensor]]:
    """The checkpoint's decoder tensors in the export dtype, split into one dict per rank."""
    tp_degree = neuron_config.tp_degree
    state_dict = load_decoder_state_dict(
        checkpoint, neuron_config.torch_dtype, tied=text.tie_word_embeddings
    )
    skeleton = Gemma3Decoder.skeleton(text, 1, 1, neuron_config.torch_dtype)
    check_tensors(state_dict, skeleton, checkpoint)
    if tp_degree == 1:
        return [{k: v.contiguous() for k, v in state_dict.items()}]
    return shard_state_dict(state_dict, text, tp_degree)
