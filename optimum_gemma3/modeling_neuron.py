"""The user-facing compiled Gemma-3: export, save, load, generate.

Mirrors the class-method surface of optimum-neuron's `NeuronModelForCausalLM`
(`get_neuron_config`, `export`, `from_pretrained`, `save_pretrained`, `generate`) so code
written for optimum-neuron models works unchanged.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path

import torch
from transformers import AutoConfig, GenerationConfig

from .compiler import TARGETS
from .compiler.neuron import missing_sdk_packages
from .exporters.artifacts import copy_tree_files, write_folder_atomically
from .exporters.export import export_to_folder, resolve_checkpoint
from .exporters.neuron_config import Gemma3NeuronConfig
from .generation import greedy_generate
from .modeling import text_config
from .runtime import Gemma3Runtime

logger = logging.getLogger(__name__)

DEFAULT_SEQUENCE_LENGTH = 4096


def target_for_instance_type(instance_type: str | None) -> str:
    """Map optimum-neuron's `instance_type` to a compile target; None picks what this host runs."""
    if instance_type is None:
        if missing_sdk_packages():
            logger.info("No Neuron SDK on this host: exporting for instance_type='cpu'.")
            return "cpu"
        return "trn1"
    if instance_type not in TARGETS:
        raise ValueError(
            f"Unknown instance_type {instance_type!r}: expected one of {', '.join(TARGETS)}."
        )
    return instance_type


class Gemma3NeuronModelForCausalLM:
    """A compiled Gemma-3 text decoder backed by an artifact folder."""

    def __init__(self, runtime: Gemma3Runtime):
        self.runtime = runtime
        self.config = runtime.config
        self.neuron_config = runtime.neuron_config
        if (runtime.folder / "generation_config.json").is_file():
            self.generation_config = GenerationConfig.from_pretrained(runtime.folder)
        else:
            self.generation_config = GenerationConfig.from_model_config(self.config)

    # -- export -----------------------------------------------------------------------

    @classmethod
    def get_neuron_config(
        cls,
        model_id: str | Path,
        batch_size: int = 1,
        sequence_length: int | None = None,
        tensor_parallel_size: int = 1,
        instance_type: str | None = None,
        torch_dtype: str | torch.dtype = torch.float32,
        max_context_length: int | None = None,
        context_encoding_buckets: list[int] | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
    ) -> Gemma3NeuronConfig:
        """A validated export config for `model_id`, with automatic bucket defaults."""
        config = AutoConfig.from_pretrained(resolve_checkpoint(model_id, revision, token))
        text = text_config(config)
        if sequence_length is None:
            sequence_length = min(text.max_position_embeddings, DEFAULT_SEQUENCE_LENGTH)
        neuron_config = Gemma3NeuronConfig(
            checkpoint_id=str(model_id),
            checkpoint_revision=revision,
            batch_size=batch_size,
            sequence_length=sequence_length,
            max_context_length=max_context_length,
            tp_degree=tensor_parallel_size,
            torch_dtype=torch_dtype,
            target=target_for_instance_type(instance_type),
            context_encoding_buckets=context_encoding_buckets,
        )
        return neuron_config.finalize(text)

    @classmethod
    def export(
        cls,
        model_id: str | Path,
        neuron_config: Gemma3NeuronConfig,
        load_weights: bool = True,
        revision: str | None = None,
        token: str | bool | None = None,
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

    # -- folders ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, model_id: str | Path, token: str | bool | None = None
    ) -> Gemma3NeuronModelForCausalLM:
        """Load a compiled folder without recompiling."""
        return cls(Gemma3Runtime(model_id, token=token))

    def save_pretrained(self, save_directory: str | Path) -> Path:
        """Write the artifact folder to `save_directory`, atomically (replaced whole)."""
        source = self.runtime.folder.resolve()
        if Path(save_directory).resolve() == source:
            return source
        return write_folder_atomically(
            Path(save_directory), lambda staging: copy_tree_files(source, staging)
        )

    # -- generation -------------------------------------------------------------------

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
    ) -> torch.Tensor:
        """Greedy generation: prompt ids followed by new ids, as transformers returns them."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        longest = int(attention_mask.sum(-1).max())
        self.runtime.bucket_for(longest)  # refuses a prompt longer than any bucket
        room = self.runtime.sequence_length - longest
        if max_new_tokens > room:
            logger.warning(
                "max_new_tokens=%d does not fit the compiled sequence_length=%d after a "
                "%d-token prompt: generating at most %d tokens.",
                max_new_tokens,
                self.runtime.sequence_length,
                longest,
                room,
            )
            max_new_tokens = room
        eos = self.generation_config.eos_token_id
        with torch.inference_mode():
            return greedy_generate(
                self.runtime.prefill,
                self.runtime.decode,
                input_ids,
                attention_mask,
                max_new_tokens,
                eos_token_id=eos,
                pad_token_id=self.runtime.pad_token_id,
            ).sequences
