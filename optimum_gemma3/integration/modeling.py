"""The user-facing compiled Gemma-3: export, save, load, push, generate.

`Gemma3NeuronModelForCausalLM` is an optimum-neuron `NeuronModelForCausalLM` (inference),
so code written for optimum-neuron models works unchanged, and transformers' pipelines
accept it. `generate()` follows transformers' semantics by using transformers' own
generation config handling, logits processors and stopping criteria around the compiled
prefill and decode programs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from optimum.neuron.models.inference.modeling_utils import NeuronModelForCausalLM
from transformers import AutoConfig, GenerationConfig, GenerationMixin
from transformers.generation import (
    GenerateDecoderOnlyOutput,
    LogitsProcessorList,
    StoppingCriteriaList,
)

from ..artifact.files import (
    MODEL_CARD_NAME,
    copy_files,
    owned_files,
    refuse_overwriting,
    save_artifact,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..compiler import TARGETS
from ..compiler.export import export_to_folder
from ..compiler.neuron import missing_sdk_packages
from ..constants import OPTIMUM_GEMMA3
from ..graphs import text_config
from ..runtime.batching import Sampling
from ..runtime.engine import Gemma3Runtime
from ..runtime.loop import decode_loop
from ..runtime.self_draft import SelfDraft
from ..runtime.speculation import (
    AssistantDrafts,
    PromptLookupDrafts,
    SpeculativeOutput,
    speculative_greedy,
)
from ..weights import resolve_checkpoint
from . import hub
from .generation_options import generation_config_fields, refusals

logger = logging.getLogger(__name__)

DEFAULT_SEQUENCE_LENGTH = 4096
# Model inputs transformers' Gemma-3 text model ignores too (no token types without images).
IGNORED_MODEL_INPUTS = ("token_type_ids",)


@dataclass
class PreparedGeneration:
    """What transformers' preparation makes of one `generate()` call."""

    config: GenerationConfig
    attention_mask: torch.Tensor
    max_new_tokens: int
    logits_processor: LogitsProcessorList
    stopping_criteria: StoppingCriteriaList


def target_for_instance_type(instance_type: str | None) -> str:
    """Map optimum-neuron's `instance_type` to a compile target; None picks what this host runs."""
    if instance_type is None:
        if missing_sdk_packages():
            logger.info("No Neuron SDK on this host: exporting for instance_type='cpu'.")
            return "cpu"
        return "trn1"
    if instance_type == "trn1n":
        return "trn1"
    if instance_type not in TARGETS:
        raise ValueError(
            f"Unknown instance_type {instance_type!r}: expected one of {', '.join(TARGETS)}."
        )
    return instance_type


class Gemma3NeuronModelForCausalLM(NeuronModelForCausalLM, GenerationMixin):
    """A compiled Gemma-3 text decoder backed by an artifact folder.

    `GenerationMixin` provides transformers' generation helpers (config preparation,
    logits processors, stopping criteria); `generate` itself is ours.
    """

    main_input_name = "input_ids"

    def __init__(self, runtime: Gemma3Runtime):
        self.runtime = runtime
        self.config = runtime.config
        self.neuron_config = runtime.neuron_config
        self._generate_lock = threading.Lock()
        self.speculation_stats: SpeculativeOutput | None = None  # the last speculative call's
        if (runtime.folder / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(runtime.folder)
        else:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    # -- export -----------------------------------------------------------------------

    @classmethod
    def get_neuron_config(
        cls,
        model_name_or_path: str | Path,
        config=None,
        token: str | bool | None = None,
        revision: str | None = None,
        instance_type: str | None = None,
        batch_size: int | None = None,
        sequence_length: int | None = None,
        tensor_parallel_size: int | None = None,
        torch_dtype: str | torch.dtype | None = None,
        max_context_length: int | None = None,
        context_encoding_buckets: list[int] | None = None,
        implementation: str | None = None,
        continuous_batching: bool | None = None,
        speculation_length: int = 0,
        draft_quantization_dtype: str | None = None,
    ) -> Gemma3NeuronConfig:
        """A validated export config for `model_name_or_path`, with automatic defaults.

        `implementation` is the auto class's choice between this class and optimum-neuron's
        own Gemma-3 (`optimum_gemma3.integration.registry`); this class compiles with
        optimum-gemma3, so only that value (or None) is accepted here. `continuous_batching`
        defaults, as in optimum-neuron, to `batch_size > 1`. `speculation_length=k` adds the
        verify program that speculative decoding checks `k` drafted tokens per row with;
        `draft_quantization_dtype="int8"` adds the self-draft's programs
        (`generate(..., self_draft=True)`).
        """
        if implementation not in (None, OPTIMUM_GEMMA3):
            raise ValueError(
                f"{cls.__name__} is the {OPTIMUM_GEMMA3} implementation; for "
                f"implementation={implementation!r} use the auto class "
                "optimum.neuron.NeuronModelForCausalLM."
            )
        if config is None:
            checkpoint = resolve_checkpoint(model_name_or_path, revision, token)
            config = AutoConfig.from_pretrained(checkpoint)
        text = text_config(config)
        if sequence_length is None:
            sequence_length = min(text.max_position_embeddings, DEFAULT_SEQUENCE_LENGTH)
        batch_size = 1 if batch_size is None else batch_size
        if continuous_batching is None:
            continuous_batching = batch_size > 1
        neuron_config = Gemma3NeuronConfig(
            checkpoint_id=str(model_name_or_path),
            checkpoint_revision=revision,
            batch_size=batch_size,
            continuous_batching=continuous_batching,
            sequence_length=sequence_length,
            max_context_length=max_context_length,
            tp_degree=1 if tensor_parallel_size is None else tensor_parallel_size,
            torch_dtype=torch_dtype,
            target=target_for_instance_type(instance_type),
            context_encoding_buckets=context_encoding_buckets,
            speculation_length=speculation_length,
            draft_quantization_dtype=draft_quantization_dtype,
        )
        return neuron_config.finalize(text)

    @classmethod
    def _get_neuron_config(
        cls,
        checkpoint_id,
        checkpoint_revision,
        instance_type,
        batch_size,
        sequence_length,
        tensor_parallel_size,
        dtype,
    ):
        return cls.get_neuron_config(
            checkpoint_id,
            revision=checkpoint_revision,
            instance_type=instance_type,
            batch_size=batch_size,
            sequence_length=sequence_length,
            tensor_parallel_size=tensor_parallel_size,
            torch_dtype=dtype,
        )

    @classmethod
    def export(
        cls,
        model_id: str | Path,
        neuron_config: Gemma3NeuronConfig,
        config=None,
        token: str | bool | None = None,
        revision: str | None = None,
        load_weights: bool = True,
        **kwargs,
    ) -> Gemma3NeuronModelForCausalLM:
        """Compile `model_id` and return the ready model (its folder is temporary until
        `save_pretrained`)."""
        workdir = Path(tempfile.mkdtemp(prefix="optimum-gemma3-export-"))
        try:
            folder = export_to_folder(
                model_id, neuron_config, workdir / "model", load_weights, revision, token
            )
            model = cls(Gemma3Runtime(folder, token=token))
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, workdir, ignore_errors=True)
        return model

    @classmethod
    def _export(
        cls, model_id, config, neuron_config, token=None, revision=None, load_weights=True, **kwargs
    ):
        """optimum-neuron's auto-class entry point (`NeuronModelForCausalLM.export`)."""
        return cls.export(
            model_id, neuron_config, token=token, revision=revision, load_weights=load_weights
        )

    # -- folders and the Hub ------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        model_id: str | Path,
        export: bool = False,
        token: str | bool | None = None,
        revision: str | None = None,
        **kwargs,
    ) -> Gemma3NeuronModelForCausalLM:
        """Load a compiled folder or Hub repo without recompiling, or export a checkpoint.

        With `export=True`, the remaining keyword arguments are export options:
        `batch_size`, `sequence_length`, `tensor_parallel_size` (alias `num_cores`),
        `torch_dtype` (alias `auto_cast_type`: `bf16`, `fp32`; fp16 is refused), `instance_type`,
        `max_context_length`, `context_encoding_buckets`, `load_weights`.
        """
        if export:
            return cls._export_from_kwargs(model_id, token=token, revision=revision, **kwargs)
        if kwargs:
            raise TypeError(
                f"Unexpected arguments {sorted(kwargs)} for loading a compiled model; pass "
                "export=True to compile a checkpoint with them."
            )
        folder = Path(model_id)
        if not folder.is_dir():
            # A Hub repo, through the HF cache (so HF_HUB_OFFLINE=1 reuses it); errors say
            # what to do (log in, request access, pass export=True for a checkpoint).
            folder = hub.download_compiled(str(model_id), revision=revision, token=token)
        return cls(Gemma3Runtime(folder, token=token))

    @classmethod
    def _from_pretrained(cls, model_id, config, **kwargs):
        return cls.from_pretrained(model_id, **kwargs)

    @classmethod
    def _export_from_kwargs(
        cls,
        model_id,
        token=None,
        revision=None,
        load_weights=True,
        num_cores=None,
        auto_cast_type=None,
        **kwargs,
    ):
        if num_cores is not None:
            kwargs.setdefault("tensor_parallel_size", num_cores)
        if auto_cast_type is not None:
            kwargs.setdefault("torch_dtype", auto_cast_type)
        neuron_config = cls.get_neuron_config(model_id, token=token, revision=revision, **kwargs)
        return cls.export(
            model_id, neuron_config, token=token, revision=revision, load_weights=load_weights
        )

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> Path:
        """Write this model's files into `save_directory`, as transformers does: files of
        an earlier save there are replaced (stale programs and shards removed), any other
        file is kept, and one this model would overwrite is refused by name. Interrupted,
        the folder keeps the previous model or is refused at load, never a mix of both."""
        source = self.runtime.folder.resolve()
        if Path(save_directory).resolve() == source:
            return source
        names, destination = owned_files(source), Path(save_directory)
        return save_artifact(
            destination, lambda staging: copy_files(source, names, staging, reuse=destination)
        )

    def _save_pretrained(self, save_directory: str, **kwargs):
        self.save_pretrained(save_directory)

    def push_to_hub(
        self,
        save_directory: str | Path,
        repository_id: str,
        private: bool | None = None,
        revision: str | None = None,
        token: bool | str = True,
        endpoint: str | None = None,
    ) -> str:
        """Save the artifact folder to `save_directory` with a model card, then upload it.

        optimum-neuron's signature: the model is saved into `save_directory` (as by
        `save_pretrained`: other files there are kept, and never uploaded), with a generated
        `README.md` (metadata, export config, usage). The repo is created if missing
        (`private` applies only then), `revision` is a branch created from main if missing,
        and programs of an earlier push that this model lacks are removed in the same
        commit. `token=True` (the default) requires a
        stored token (`hf auth login`) and fails with that advice otherwise.

        Returns the URL of the commit, `{endpoint}/{repo_id}/commit/{sha}`.
        """
        # A README.md of the user's there is refused before the model is saved beside it.
        refuse_overwriting(Path(save_directory).absolute(), [MODEL_CARD_NAME])
        folder = self.save_pretrained(save_directory)
        return hub.push_folder(
            folder,
            self.neuron_config,
            repository_id,
            private=private,
            revision=revision,
            token=token,
            endpoint=endpoint,
        )

    # -- generation -------------------------------------------------------------------

    def can_generate(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        streamer=None,
        tokenizer=None,
        prefix_allowed_tokens_fn=None,
        use_model_defaults: bool | None = None,
        assistant_model: Gemma3NeuronModelForCausalLM | None = None,
        self_draft: bool = False,
        **kwargs,
    ) -> torch.LongTensor | GenerateDecoderOnlyOutput:
        """transformers' `generate()` for greedy search and sampling on the compiled model.

        `generation_config` defaults to the model's (eos `[1, 106]` for Gemma-3); keyword
        arguments override its fields, prepared as transformers does. Each field is honoured
        with transformers' meaning or refused with a `ValueError` naming it
        (`generation_options.GENERATION_OPTIONS`: no beam search, assisted decoding,
        attentions or hidden states). With `return_dict_in_generate=True` the result is a
        `GenerateDecoderOnlyOutput` whose `scores` / `logits` (with `output_scores` /
        `output_logits`) are per-step `[B, V]` fp32 tensors, computed in full on every
        step. A length beyond the compiled `sequence_length` is clamped with a warning.
        `tokenizer` is needed for `stop_strings`, as in transformers.

        Speculative decoding, for greedy search on a model exported with
        `speculation_length=k`: `prompt_lookup_num_tokens=N` drafts from n-grams of the
        prompt and output, `assistant_model=` (another compiled Gemma-3 with the same
        vocabulary) drafts `num_assistant_tokens`, and so does `self_draft=True` (the model's
        own int8 copy, on a model also exported with `draft_quantization_dtype="int8"`); at
        most `k` drafts a round, checked by the verify program, so the tokens are plain
        greedy decoding's. The counts of the last such call are in `speculation_stats`.

        Concurrent calls are safe: they run one at a time (the model holds one set of KV
        caches), each returning what it would alone.
        """
        prefill, prefill_inputs = self._prompt_inputs(input_ids, kwargs)
        prepared = self._prepare_generation(
            input_ids,
            attention_mask,
            generation_config,
            logits_processor,
            stopping_criteria,
            tokenizer,
            prefix_allowed_tokens_fn,
            use_model_defaults,
            kwargs,
        )
        generation_config = prepared.config
        as_dict = generation_config.return_dict_in_generate
        drafts = self._draft_source(generation_config, assistant_model, self_draft)
        # The whole call holds the lock: every step reads and writes the runtime's caches.
        with self._generate_lock, torch.inference_mode():
            if drafts is not None:
                self.speculation_stats = speculative_greedy(
                    self.runtime,
                    drafts,
                    prefill,
                    input_ids,
                    prepared.attention_mask,
                    prepared.max_new_tokens,
                    num_drafts=self._num_drafts(generation_config),
                    pad_token_id=int(generation_config._pad_token_tensor),
                    eos_token_id=generation_config.eos_token_id,
                    logits_processor=prepared.logits_processor,
                    stopping_criteria=prepared.stopping_criteria,
                    streamer=streamer,
                    prefill_inputs=prefill_inputs,
                )
                sequences = self.speculation_stats.sequences
                return GenerateDecoderOnlyOutput(sequences=sequences) if as_dict else sequences
            output = decode_loop(
                prefill,
                self.runtime.decode,
                input_ids,
                prepared.attention_mask,
                prepared.max_new_tokens,
                pad_token_id=int(generation_config._pad_token_tensor),
                eos_token_id=generation_config.eos_token_id,
                logits_processor=prepared.logits_processor,
                stopping_criteria=prepared.stopping_criteria,
                do_sample=generation_config.do_sample,
                streamer=streamer,
                output_logits=as_dict and bool(generation_config.output_logits),
                output_scores=as_dict and generation_config.output_scores,
                prefill_inputs=prefill_inputs,
            )
        if not as_dict:
            return output.sequences
        return GenerateDecoderOnlyOutput(
            sequences=output.sequences,
            scores=output.scores if generation_config.output_scores else None,
            logits=output.raw_logits if generation_config.output_logits else None,
        )

    def _draft_source(self, config: GenerationConfig, assistant_model, self_draft: bool):
        """Where speculative decoding's drafts come from (None: decode without drafts),
        refusing what it cannot honour."""
        lookup = config.prompt_lookup_num_tokens
        sources = {
            "prompt_lookup_num_tokens": bool(lookup),
            "assistant_model": assistant_model is not None,
            "self_draft": bool(self_draft),
        }
        chosen = [name for name, given in sources.items() if given]
        if not chosen:
            return None
        if len(chosen) > 1:
            raise ValueError(f"generate() got {' and '.join(chosen)}: choose one draft source.")
        if assistant_model is not None and not isinstance(
            assistant_model, Gemma3NeuronModelForCausalLM
        ):
            raise ValueError(
                f"assistant_model is a {type(assistant_model).__name__}: it must be a compiled "
                "Gemma-3 (Gemma3NeuronModelForCausalLM) with the same vocabulary, drafting in "
                "its own KV caches."
            )
        problems = []
        if config.do_sample:
            problems.append("do_sample=True (speculative decoding here is greedy)")
        if config.return_dict_in_generate and (config.output_scores or config.output_logits):
            problems.append("output_scores / output_logits")
        if problems:
            raise ValueError(
                f"Speculative decoding ({chosen[0]}) cannot run with {' and '.join(problems)}: "
                "drop the draft source to decode without it."
            )
        if not self.runtime.speculation_length:
            logger.warning(
                "This model was exported without a verify program (speculation_length=0): "
                "generating without drafts (the same tokens). Re-export it with "
                "speculation_length=k to check k drafted tokens per step."
            )
            return None
        if lookup:
            return PromptLookupDrafts(config.max_matching_ngram_size, config.eos_token_id)
        if self_draft:
            return AssistantDrafts(SelfDraft(self.runtime), int(config._pad_token_tensor))
        assistant = assistant_model.runtime
        ours, theirs = text_config(self.config).vocab_size, text_config(assistant.config).vocab_size
        if ours != theirs:
            raise ValueError(
                f"assistant_model has a vocabulary of {theirs} tokens, this model {ours}: the "
                "assistant must share the tokenizer."
            )
        return AssistantDrafts(assistant, int(config._pad_token_tensor))

    def _num_drafts(self, config: GenerationConfig) -> int:
        """Drafts per round: the draft source's count, at most `speculation_length`."""
        wanted = config.prompt_lookup_num_tokens or config.num_assistant_tokens
        return min(int(wanted), self.runtime.speculation_length)

    def _prompt_inputs(self, input_ids: torch.Tensor, model_inputs: dict) -> tuple:
        """The prefill function `generate()` runs and its per-token inputs, taking the model
        inputs it handles out of `model_inputs`. A text model takes no images."""
        if model_inputs.pop("pixel_values", None) is not None:
            raise ValueError(
                "generate() got pixel_values, but Gemma3NeuronModelForCausalLM generates from "
                "text only: load an image-text-to-text export with "
                "optimum_gemma3.Gemma3NeuronModelForImageTextToText to give it images."
            )
        return self.runtime.prefill, ()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: torch.Tensor | None = None,
        sampling_params: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """optimum-neuron's model entry point, as its vLLM runner calls it: fp32 logits
        `[rows, 1, V]` of the next token of each row, whose KV cache row is `seq_ids[row]`
        (default: row i in cache row i).

        Context encoding when the input has more than one token and starts at position 0:
        each row's prompt fills its cache row (and no other). The real tokens are those
        whose position counts up from the first position 0, so right padding (vLLM's: pads
        at position 0) and left padding (optimum-neuron's `generate()`: pads at position 1)
        both work. Otherwise token generation: one token per row at its position. With
        `continuous_batching=False` in the export config, every call covers the whole batch
        in order, as optimum-neuron requires there. `sampling_params` (`[rows, 3]`: top_k,
        top_p, temperature) is checked and otherwise unused: sampling is on the host
        (`on_device_sampling=False`), from these logits.

        Shares the cache rows with `generate()`: do not run both on one model at once.
        """
        if input_ids.dim() != 2 or position_ids.shape != input_ids.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and position_ids "
                f"{tuple(position_ids.shape)} must both be [rows, tokens]."
            )
        rows = input_ids.shape[0]
        if seq_ids is None:
            seq_ids = torch.arange(rows)
        seq_ids = seq_ids.reshape(-1).to(torch.long)
        if not self.neuron_config.continuous_batching and not torch.equal(
            seq_ids, torch.arange(self.neuron_config.batch_size)
        ):
            raise ValueError(
                f"seq_ids={seq_ids.tolist()}: this model was exported with "
                "continuous_batching=False, so every call covers the whole batch "
                f"(seq_ids 0..{self.neuron_config.batch_size - 1}). Re-export it with "
                "continuous_batching=True to run requests in their own cache rows."
            )
        if sampling_params is not None and tuple(sampling_params.shape) != (rows, 3):
            raise ValueError(
                f"sampling_params has shape {tuple(sampling_params.shape)}: expected "
                f"({rows}, 3), one (top_k, top_p, temperature) per row."
            )
        with self._generate_lock, torch.inference_mode():
            if input_ids.shape[1] > 1 and int(position_ids.min()) == 0:
                first = (position_ids == 0).long().argmax(-1, keepdim=True)
                index = torch.arange(input_ids.shape[1])
                mask = (position_ids == index - first).long()
                logits = self.runtime.prefill(input_ids, mask, seq_ids)
            else:
                logits = self.runtime.decode(input_ids[:, -1], position_ids[:, -1], seq_ids)
            return logits.full().float()[:, None, :]

    def _prepare_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        generation_config: GenerationConfig | None,
        logits_processor: LogitsProcessorList | None,
        stopping_criteria: StoppingCriteriaList | None,
        tokenizer,
        prefix_allowed_tokens_fn,
        use_model_defaults: bool | None,
        kwargs: dict,
    ) -> PreparedGeneration:
        """transformers' preparation of a generation: the config with keyword overrides,
        refusals by name, special tokens, lengths clamped to the compiled model, and
        transformers' own logits processors and stopping criteria in its order."""
        kwargs = {key: value for key, value in kwargs.items() if key not in IGNORED_MODEL_INPUTS}
        not_options = sorted(set(kwargs) - generation_config_fields())
        if not_options:
            raise ValueError(
                f"generate() does not accept {not_options}: the compiled model takes input_ids "
                "and attention_mask as model inputs (it keeps its own KV cache and positions), "
                "plus GenerationConfig fields, logits_processor, stopping_criteria, "
                "prefix_allowed_tokens_fn, streamer and tokenizer."
            )
        generation_config, _ = self._prepare_generation_config(
            generation_config, use_model_defaults, **kwargs
        )
        problems = refusals(generation_config)
        if problems:
            raise ValueError(
                "generate() on the compiled model cannot honour these generation options: "
                + "; ".join(problems)
                + "."
            )
        self._prepare_special_tokens(generation_config, attention_mask is not None, device="cpu")
        if attention_mask is None:
            attention_mask = self._prepare_attention_mask_for_generation(
                input_ids, generation_config, {}
            )
        max_new_tokens = self._prepare_lengths(generation_config, input_ids, attention_mask, kwargs)
        processors = self._get_logits_processor(
            generation_config=generation_config,
            input_ids_seq_length=input_ids.shape[1],
            encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
            logits_processor=logits_processor or LogitsProcessorList(),
            device="cpu",
            model_kwargs={},
        )
        criteria = self._get_stopping_criteria(
            generation_config=generation_config,
            stopping_criteria=stopping_criteria or StoppingCriteriaList(),
            tokenizer=tokenizer,
        )
        return PreparedGeneration(
            generation_config, attention_mask, max_new_tokens, processors, criteria
        )

    def request_sampling(
        self, prompt_ids: list[int], tokenizer=None, seed: int | None = None, **kwargs
    ) -> Sampling:
        """One continuous-batching request's settings, prepared as `generate()` prepares a
        call with the same prompt and keyword arguments (GenerationConfig fields, e.g.
        `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `stop_strings`
        with `tokenizer`). `seed` seeds the request's own generator: its draws equal
        `generate()`'s after `torch.manual_seed(seed)`. Unseeded, it draws from a seed
        taken from torch's global generator."""
        input_ids = torch.tensor([prompt_ids], dtype=torch.long)
        prepared = self._prepare_generation(
            input_ids, torch.ones_like(input_ids), None, None, None, tokenizer, None, None, kwargs
        )
        config = prepared.config
        eos = config.eos_token_id
        generator = None
        if config.do_sample:
            if seed is None:
                seed = int(torch.randint(0, 2**63 - 1, ()))
            generator = torch.Generator().manual_seed(seed)
        return Sampling(
            max_new_tokens=prepared.max_new_tokens,
            do_sample=bool(config.do_sample),
            logits_processor=prepared.logits_processor,
            stopping_criteria=prepared.stopping_criteria,
            eos_token_ids=tuple([eos] if isinstance(eos, int) else eos or ()),
            generator=generator,
        )

    def _prepare_lengths(self, generation_config, input_ids, attention_mask, kwargs) -> int:
        """transformers' max/min length preparation, then the new tokens that fit the
        compiled sequence_length (`max_length` clamped to match)."""
        length = input_ids.shape[1]
        has_default_max_length = (
            kwargs.get("max_length") is None and generation_config.max_length is not None
        )
        self._prepare_generated_length(
            generation_config,
            has_default_max_length=has_default_max_length,
            has_default_min_length=(
                kwargs.get("min_length") is None and generation_config.min_length is not None
            ),
            model_input_name="input_ids",
            input_ids_length=length,
            inputs_tensor=input_ids,
        )
        self._validate_generated_length(generation_config, length, has_default_max_length)
        max_new_tokens = self._max_new_tokens(generation_config, input_ids, attention_mask)
        generation_config.max_length = length + max_new_tokens
        generation_config.max_new_tokens = max_new_tokens
        return max_new_tokens

    def _max_new_tokens(self, generation_config, input_ids, attention_mask) -> int:
        """New tokens to generate: up to the prepared max_length, clamped to what fits."""
        longest = int(attention_mask.sum(-1).max())
        self.runtime.bucket_for(longest)  # refuses a prompt longer than any bucket
        wanted = generation_config.max_length - input_ids.shape[1]
        room = self.runtime.sequence_length - longest
        if wanted > room:
            logger.warning(
                "%d new tokens do not fit the compiled sequence_length=%d after a %d-token "
                "prompt: generating at most %d tokens.",
                wanted,
                self.runtime.sequence_length,
                longest,
                room,
            )
        return max(0, min(wanted, room))
