"""A compiled artifact folder, loaded once and ready to run prefill and decode.

Loading checks before running: the export config parses and was written by compatible
versions of this library, torch and the compiler; every program exists and matches its
recorded checksum; the weights are safetensors with exactly the expected tensors. It
compiles nothing and needs no model source for the programs.

The runtime owns the weights and one set of KV caches shared by all programs; callers
pass user-sized batches and the runtime picks the smallest prefill bucket that fits,
left-aligns prompts into it and pads the batch up to the compiled batch size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig

from . import __version__
from .compiler import backend_for_target
from .exporters.artifacts import (
    NEURON_CONFIG_NAME,
    WEIGHTS_NAME,
    ArtifactError,
    decode_program_name,
    prefill_program_name,
    verify_file,
)
from .exporters.neuron_config import Gemma3NeuronConfig
from .generation import left_align
from .modeling import Gemma3Decoder, text_config
from .modeling.program import cache_tensors, canonical
from .weights import check_tensors, load_decoder_state_dict

logger = logging.getLogger(__name__)


def load_neuron_config(folder: Path) -> Gemma3NeuronConfig:
    """Read `neuron_config.json`, turning every failure into an error that names the file."""
    path = verify_file(folder, NEURON_CONFIG_NAME)
    try:
        config = Gemma3NeuronConfig.from_pretrained(folder)
    except (ValueError, RuntimeError, OSError, TypeError, AssertionError) as error:
        raise ArtifactError(f"{path} cannot be used: {error}") from error
    if not isinstance(config, Gemma3NeuronConfig):
        raise ArtifactError(f"{path} was not written by optimum-gemma3.")
    return config


def check_versions(neuron_config: Gemma3NeuronConfig, versions: dict[str, str], path: Path):
    """Refuse an artifact compiled by another library, torch or compiler version."""
    here = {
        "optimum_gemma3_version": __version__,
        "torch_version": torch.__version__,
        "compiler": versions["compiler"],
        "compiler_version": versions["compiler_version"],
    }
    for field, current in here.items():
        recorded = getattr(neuron_config, field)
        if recorded != current:
            raise ArtifactError(
                f"{path / NEURON_CONFIG_NAME} records {field}={recorded!r} but this host has "
                f"{current!r}: compiled programs are tied to the versions that built them. "
                "Re-export the model here, or install the recorded versions."
            )


class Gemma3Runtime:
    """Programs, weights and caches of one artifact folder."""

    def __init__(self, folder: str | Path, token: str | bool | None = None):
        folder = Path(folder)
        self.folder = folder
        self.neuron_config = nc = load_neuron_config(folder)
        self.config = AutoConfig.from_pretrained(folder)
        text = text_config(self.config)
        backend = backend_for_target(nc.target)
        check_versions(nc, backend.versions(), folder)

        def program(name: str):
            return backend.load(verify_file(folder, name, nc.artifact_files.get(name)))

        suffix = backend.program_suffix
        self.buckets = list(nc.context_encoding_buckets)
        self.prefill_programs = {b: program(prefill_program_name(b, suffix)) for b in self.buckets}
        self.decode_program = program(decode_program_name(suffix))

        skeleton = Gemma3Decoder.skeleton(text, nc.batch_size, nc.sequence_length, nc.torch_dtype)
        self.weights = canonical(self._load_weights(folder, skeleton, token))
        self.caches = {name: torch.zeros_like(t) for name, t in cache_tensors(skeleton).items()}
        self.pad_token_id = self.config.get_text_config().pad_token_id or 0

    def _load_weights(self, folder: Path, skeleton, token) -> dict[str, torch.Tensor]:
        nc = self.neuron_config
        if WEIGHTS_NAME in nc.artifact_files:
            path = verify_file(folder, WEIGHTS_NAME)
            try:
                weights = load_file(path)
            except (SafetensorError, OSError) as error:
                raise ArtifactError(
                    f"{path} is not a readable safetensors file: {error}"
                ) from error
        else:
            # Exported with load_weights=False: the weights come from the source checkpoint.
            from .exporters.export import resolve_checkpoint

            path = resolve_checkpoint(nc.checkpoint_id, nc.checkpoint_revision, token)
            weights = load_decoder_state_dict(
                path, nc.torch_dtype, tied=skeleton.config.tie_word_embeddings
            )
        try:
            check_tensors(weights, skeleton, path)
        except ValueError as error:
            raise ArtifactError(str(error)) from error
        return weights

    @property
    def batch_size(self) -> int:
        return self.neuron_config.batch_size

    @property
    def sequence_length(self) -> int:
        return self.neuron_config.sequence_length

    @property
    def max_context_length(self) -> int:
        return self.neuron_config.max_context_length

    def bucket_for(self, prompt_length: int) -> int:
        """The smallest compiled prefill length that holds `prompt_length` tokens."""
        for bucket in self.buckets:
            if prompt_length <= bucket:
                return bucket
        raise ValueError(
            f"A prompt of {prompt_length} tokens exceeds max_context_length="
            f"{self.max_context_length} of this compiled model: shorten it or re-export with "
            "a larger max_context_length / sequence_length."
        )

    def _pad_batch(self, tensor: torch.Tensor, fill: int) -> torch.Tensor:
        rows = tensor.shape[0]
        if rows > self.batch_size:
            raise ValueError(
                f"Batch of {rows} rows exceeds the compiled batch_size={self.batch_size}: "
                "split the batch or re-export with a larger batch_size."
            )
        if rows == self.batch_size:
            return tensor
        padding = torch.full((self.batch_size - rows, *tensor.shape[1:]), fill, dtype=tensor.dtype)
        return torch.cat([tensor, padding])

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, V]` of each prompt's last token; fills the caches of these rows."""
        rows = input_ids.shape[0]
        bucket = self.bucket_for(int(attention_mask.sum(-1).max()))
        ids, mask = left_align(input_ids, attention_mask, self.pad_token_id, bucket)
        ids, mask = self._pad_batch(ids, self.pad_token_id), self._pad_batch(mask, 0)
        logits = self.prefill_programs[bucket](self.weights, self.caches, ids, mask)
        return logits[:rows]

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, V]` for one new token per row at `positions`; updates the caches."""
        rows = input_ids.shape[0]
        if int(positions.max()) >= self.sequence_length:
            raise ValueError(
                f"Position {int(positions.max())} is beyond the compiled sequence_length="
                f"{self.sequence_length}."
            )
        ids = self._pad_batch(input_ids, self.pad_token_id)
        logits = self.decode_program(self.weights, self.caches, ids, self._pad_batch(positions, 0))
        return logits[:rows]
