"""Which `GenerationConfig` fields `generate()` honours, ignores or refuses.

Why a table: transformers' `GenerationConfig.update()` accepts every field, so an option
the compiled model does not implement (beam search, assisted decoding, attentions) would
otherwise be dropped silently and the user would get other tokens than they asked for.
Every field of transformers 4.57's `GenerationConfig` is listed here once:

- supported: transformers' own preparation, logits processors and stopping criteria do
  the work around the compiled programs, so the option has transformers' meaning;
- ignored: it cannot change the tokens here (cache and compilation choices: the compiled
  programs own a static KV cache and are compiled ahead of time), or is metadata;
- refused: a decoding mode or output the compiled programs do not have; a value other
  than its default (or a listed harmless one) is a `ValueError` naming the field.

A field missing from the table (one a later transformers adds) is refused whenever it is
not at `GenerationConfig()`'s default, so it cannot slip by either.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass

from transformers import GenerationConfig


class Handling(enum.Enum):
    SUPPORTED = "supported"
    IGNORED = "ignored"
    REFUSED = "refused"


@dataclass(frozen=True)
class Option:
    handling: Handling
    why: str = ""  # for ignored and refused fields: what the user reads
    # An ignored field still refuses these values (they change transformers' tokens).
    refused_values: tuple = ()
    # A refused field still accepts these values beside its default (they change nothing).
    harmless_values: tuple = ()


SUPPORTED = Option(Handling.SUPPORTED)
BEAM_SEARCH = Option(
    Handling.REFUSED,
    "it belongs to beam search, which the compiled model does not run (greedy search and "
    "sampling only: num_beams=1)",
)
ASSISTED = Option(
    Handling.REFUSED,
    "it belongs to assisted decoding with another tokenizer or early exit, which the compiled "
    "model does not run (assistant_model sharing the tokenizer, or prompt_lookup_num_tokens)",
)
DRAFT_LENGTH = Option(
    Handling.IGNORED,
    "drafts are num_assistant_tokens long (at most the export's speculation_length) every "
    "round; verification keeps the tokens greedy decoding's whatever the drafts",
)
CONTRASTIVE = Option(
    Handling.REFUSED, "contrastive search is not supported by the compiled model; leave it unset"
)
NOT_RETURNED = Option(
    Handling.REFUSED,
    "the compiled programs return logits only, not attentions or hidden states",
)
STATIC_CACHE = Option(
    Handling.IGNORED,
    "the compiled programs own a static KV cache and return no past_key_values",
    refused_values=("quantized",),
)
AHEAD_OF_TIME = Option(Handling.IGNORED, "the programs are compiled ahead of time")
METADATA = Option(Handling.IGNORED, "metadata, not a generation option")

GENERATION_OPTIONS: dict[str, Option] = {
    # Length and stopping: transformers' length preparation and stopping criteria.
    "max_length": SUPPORTED,
    "max_new_tokens": SUPPORTED,
    "min_length": SUPPORTED,
    "min_new_tokens": SUPPORTED,
    "max_time": SUPPORTED,
    "stop_strings": SUPPORTED,
    "eos_token_id": SUPPORTED,
    "pad_token_id": SUPPORTED,
    "bos_token_id": SUPPORTED,
    # Selection and logits processors/warpers, built by `_get_logits_processor`.
    "do_sample": SUPPORTED,
    "temperature": SUPPORTED,
    "top_k": SUPPORTED,
    "top_p": SUPPORTED,
    "min_p": SUPPORTED,
    "typical_p": SUPPORTED,
    "epsilon_cutoff": SUPPORTED,
    "eta_cutoff": SUPPORTED,
    "repetition_penalty": SUPPORTED,
    # For a decoder-only model transformers applies these to the prompt's ids.
    "encoder_repetition_penalty": SUPPORTED,
    "encoder_no_repeat_ngram_size": SUPPORTED,
    "no_repeat_ngram_size": SUPPORTED,
    "bad_words_ids": SUPPORTED,
    "sequence_bias": SUPPORTED,
    "suppress_tokens": SUPPORTED,
    "begin_suppress_tokens": SUPPORTED,
    "forced_bos_token_id": SUPPORTED,
    "forced_eos_token_id": SUPPORTED,
    "renormalize_logits": SUPPORTED,
    "remove_invalid_values": SUPPORTED,
    "exponential_decay_length_penalty": SUPPORTED,
    "watermarking_config": SUPPORTED,
    # Outputs: `GenerateDecoderOnlyOutput` with per-step scores and logits.
    "return_dict_in_generate": SUPPORTED,
    "output_scores": SUPPORTED,
    "output_logits": SUPPORTED,
    "output_attentions": NOT_RETURNED,
    "output_hidden_states": NOT_RETURNED,
    # Cache and compilation: the artifact decides them; tokens are the same either way.
    "use_cache": Option(Handling.IGNORED, "the compiled programs always use their KV cache"),
    "cache_implementation": STATIC_CACHE,
    "cache_config": STATIC_CACHE,
    "return_legacy_cache": STATIC_CACHE,
    "prefill_chunk_size": Option(
        Handling.IGNORED, "a prompt is prefilled by one compiled program, never in chunks"
    ),
    "compile_config": AHEAD_OF_TIME,
    "disable_compile": AHEAD_OF_TIME,
    "decoder_start_token_id": Option(
        Handling.IGNORED, "encoder-decoder models only; transformers ignores it here too"
    ),
    # Decoding modes the compiled model does not run.
    "num_beams": BEAM_SEARCH,
    "num_beam_groups": BEAM_SEARCH,
    "diversity_penalty": BEAM_SEARCH,
    "length_penalty": BEAM_SEARCH,
    "early_stopping": BEAM_SEARCH,
    "constraints": BEAM_SEARCH,
    "force_words_ids": BEAM_SEARCH,
    "num_return_sequences": Option(
        Handling.REFUSED,
        "one sequence per prompt is generated; repeat the prompt in the batch to sample "
        "several continuations",
    ),
    "penalty_alpha": CONTRASTIVE,
    "low_memory": CONTRASTIVE,
    "dola_layers": Option(
        Handling.REFUSED, "DoLa decoding needs hidden states the compiled programs do not return"
    ),
    "guidance_scale": Option(
        Handling.REFUSED,
        "classifier-free guidance runs the model on a second, unconditional prompt, which the "
        "compiled generate() does not",
        harmless_values=(1.0,),
    ),
    "token_healing": Option(
        Handling.REFUSED, "token healing is not supported by the compiled model; leave it unset"
    ),
    # Speculative decoding (greedy, checked by the verify program: the same tokens).
    "prompt_lookup_num_tokens": SUPPORTED,
    "max_matching_ngram_size": SUPPORTED,
    "num_assistant_tokens": SUPPORTED,
    "num_assistant_tokens_schedule": DRAFT_LENGTH,
    "assistant_confidence_threshold": DRAFT_LENGTH,
    "is_assistant": ASSISTED,
    "assistant_early_exit": ASSISTED,
    "assistant_lookbehind": ASSISTED,
    "target_lookbehind": ASSISTED,
    # Written by transformers itself.
    "transformers_version": METADATA,
    "_from_model_config": METADATA,
    "_commit_hash": METADATA,
    "_original_object_hash": METADATA,
}

_UNSET = object()


@functools.cache
def _default_config() -> GenerationConfig:
    """transformers' defaults, built once (never modified)."""
    return GenerationConfig()


@functools.cache
def generation_config_fields() -> frozenset[str]:
    """Every field transformers' `GenerationConfig` has: its serialized ones, plus those
    `to_dict()` leaves out (`compile_config` and the hashes)."""
    default = _default_config()
    return frozenset({*default.to_dict(), *vars(default), "_original_object_hash"})


def refusals(config: GenerationConfig) -> list[str]:
    """Why each field of `config` that the compiled model cannot honour is refused, one
    line per field (empty when every field is supported, ignored or at a harmless value)."""
    default = _default_config()
    problems = []
    for name, value in vars(config).items():
        if name.startswith("_") and name.endswith("_tensor"):
            continue  # set by transformers' own `_prepare_special_tokens`
        option = GENERATION_OPTIONS.get(name)
        if option is None:
            if not _same(value, getattr(default, name, _UNSET)):
                problems.append(
                    f"{name}={value!r}: not a generation option this version of optimum-gemma3 "
                    "knows; leave it unset"
                )
        elif option.handling is Handling.IGNORED:
            if any(_same(value, refused) for refused in option.refused_values):
                problems.append(f"{name}={value!r}: {option.why}")
        elif option.handling is Handling.REFUSED:
            accepted = (getattr(default, name), *option.harmless_values)
            if not any(_same(value, ok) for ok in accepted):
                problems.append(f"{name}={value!r}: {option.why}")
    return problems


def _same(value, other) -> bool:
    """`value == other` for option values, False where the comparison has no truth value
    (a tensor against a number)."""
    if value is other:
        return True
    try:
        return bool(value == other)
    except (TypeError, ValueError, RuntimeError):
        return False
