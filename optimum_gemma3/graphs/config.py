"""Read what the graphs need from a transformers config, and nothing else.

Every size-specific value (head counts, RoPE bases and scaling, query scalar, window,
layer pattern) comes from `Gemma3TextConfig`, so one code path serves 270m to 27b.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import Gemma3TextConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from ..constants import MULTIMODAL_MODEL_TYPE, TEXT_MODEL_TYPE

SLIDING = "sliding_attention"
FULL = "full_attention"
LAYER_TYPES = (SLIDING, FULL)

# RoPE variants whose frequencies are fixed at build time. "dynamic" and "longrope"
# change them with the sequence length, which a static graph cannot follow.
STATIC_ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def text_config(config: PretrainedConfig) -> Gemma3TextConfig:
    """Return the Gemma-3 text config of a `gemma3_text` or multimodal `gemma3` config.

    Multimodal configs often omit text fields; going through `Gemma3TextConfig` fills
    them with the same defaults transformers uses.
    """
    if config.model_type == MULTIMODAL_MODEL_TYPE:
        config = config.get_text_config()
    if config.model_type != TEXT_MODEL_TYPE:
        raise ValueError(
            f"Unsupported model_type {config.model_type!r}: optimum-gemma3 handles "
            f"{TEXT_MODEL_TYPE!r} and {MULTIMODAL_MODEL_TYPE!r} (multimodal, text decoder only) "
            "checkpoints."
        )
    if not isinstance(config, Gemma3TextConfig):
        config = Gemma3TextConfig(**config.to_dict())
    if config.attn_logit_softcapping is not None or config.final_logit_softcapping is not None:
        raise ValueError(
            "Gemma-3 has no logit soft-capping; this config sets attn_logit_softcapping="
            f"{config.attn_logit_softcapping}, final_logit_softcapping="
            f"{config.final_logit_softcapping}, which these graphs do not implement."
        )
    if getattr(config, "use_bidirectional_attention", False):
        raise ValueError("use_bidirectional_attention=True (embedding models) is not supported.")
    return config


@dataclass(frozen=True)
class ImageTokens:
    """Where a multimodal checkpoint's image features enter its text decoder.

    `token_id` is the placeholder the processor writes once per image feature;
    `per_image` (`mm_tokens_per_image`) is how many features each image has, so also the
    longest block of image tokens that attend to each other both ways.
    """

    token_id: int
    per_image: int

    @classmethod
    def of(cls, config: PretrainedConfig) -> ImageTokens:
        """The image tokens of a multimodal `gemma3` config (refusing a text-only one)."""
        if (
            config.model_type != MULTIMODAL_MODEL_TYPE
            or getattr(config, "vision_config", None) is None
        ):
            raise ValueError(
                f"A {config.model_type!r} checkpoint has no vision tower: images need a "
                f"multimodal {MULTIMODAL_MODEL_TYPE!r} checkpoint (Gemma-3 4b, 12b, 27b)."
            )
        return cls(int(config.image_token_id), int(config.mm_tokens_per_image))


def rope_frequencies(config: Gemma3TextConfig, layer_type: str) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (fp32) and cos/sin scaling of one layer type, as transformers has them.

    Sliding layers use `rope_local_base_freq` and are never scaled; full layers use
    `rope_theta` with `rope_scaling` (linear x8 on 4b+). transformers' own RoPE init
    functions compute both, so every static scaling type it knows is exact here.
    """
    config = copy.deepcopy(config)
    if layer_type == SLIDING:
        config.rope_theta = config.rope_local_base_freq
        config.rope_scaling = {"rope_type": "default"}
    scaling = config.rope_scaling if isinstance(config.rope_scaling, dict) else {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in STATIC_ROPE_TYPES:
        raise ValueError(
            f"rope_scaling type {rope_type!r} depends on the sequence length and cannot be "
            f"compiled into a static graph; supported: {', '.join(STATIC_ROPE_TYPES)}."
        )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(attention_scaling)
