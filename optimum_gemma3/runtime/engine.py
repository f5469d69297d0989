"""A compiled artifact folder, loaded once and ready to run prefill and decode.

Loading checks before running: the export config parses and was written by compatible
versions of this library, torch and the compiler; this host can run the programs (its
CPU has the instruction set they were compiled for, and the C++ kernels their ops profile
calls load here); every program exists and matches its recorded checksum; the weights
are safetensors with exactly the expected tensors. It compiles nothing and needs no
model source for the programs.

Each rank engine owns its weights and one set of KV caches shared by all its programs;
callers pass user-sized batches: each prompt is prefilled alone into its cache row, in
the smallest bucket that holds it, and decode pads the batch up to the compiled size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoConfig

from ..artifact.checks import check_host_runs, check_versions, load_neuron_config
from ..compiler import backend_for_target
from ..graphs import text_config
from ..graphs.decoder import head_weight_name
from .head import HostHead
from .logits import NextTokenLogits
from .loop import left_align
from .pool import RankPool
from .rank import RankEngine

logger = logging.getLogger(__name__)


class Gemma3Runtime:
    """A compiled folder ready to run: user-sized batches in, logits out.

    Checks the folder against this host, then runs it on one `RankEngine` in this process,
    or with `tp_degree > 1` on a `RankPool` of rank processes it starts and stops itself.
    Where the programs end at the final norm (`head_on_host`), it runs the head itself,
    computing each step's logits only as far as the caller reads them.
    """

    def __init__(self, folder: str | Path, token: str | bool | None = None):
        folder = Path(folder)
        self.folder = folder
        self.neuron_config = nc = load_neuron_config(folder)
        self.config = AutoConfig.from_pretrained(folder)
        backend = backend_for_target(nc.target)
        check_versions(nc, backend.versions(), folder)
        check_host_runs(nc, backend.runs_program_isa, folder)
        self.buckets = list(nc.context_encoding_buckets)
        self.pad_token_id = self.config.get_text_config().pad_token_id or 0
        text = text_config(self.config)
        if nc.tp_degree == 1:
            self.engine = RankEngine(folder, nc, text, token=token)
        else:
            self.engine = RankPool(folder, nc, text.vocab_size, token)
        self.head = None
        if nc.head_on_host:
            self.head = HostHead(self.engine.weights[head_weight_name(text)], nc.ops_profile)
        self._warm_up()

    def _warm_up(self) -> None:
        """Run the smallest prefill, the decode step and the head once, at load, then zero
        the caches.

        Why: the first call of a program pays for its lazy set-up and for reading the
        memory-mapped weights in from disk; done here, the first request is as fast as the
        rest. Zeroing leaves the caches as loading made them, so no request can depend on
        the warm-up's dummy tokens.
        """
        with torch.inference_mode():
            ids = torch.full((1, self.buckets[0]), self.pad_token_id)
            hidden = self.engine.prefill(ids, torch.ones_like(ids), torch.tensor([0]))
            self._next_token_logits(hidden).near_top(1)
            ids = torch.full((self.batch_size, 1), self.pad_token_id)
            self.engine.decode(ids, torch.zeros(self.batch_size, dtype=torch.long))
            self.engine.zero_caches()

    def close(self) -> None:
        """Stop the rank processes of a tensor-parallel model (also done when collected)."""
        self.engine.close()

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
            f"A prompt of {prompt_length} tokens exceeds the largest prefill bucket "
            f"({self.buckets[-1]} tokens) of this compiled model: shorten it or re-export with "
            "larger context_encoding_buckets / max_context_length / sequence_length."
        )

    def _check_rows(self, rows: int) -> None:
        if rows > self.batch_size:
            raise ValueError(
                f"Batch of {rows} rows exceeds the compiled batch_size={self.batch_size}: "
                "split the batch or re-export with a larger batch_size."
            )

    def _pad_batch(self, tensor: torch.Tensor, fill: int) -> torch.Tensor:
        rows = tensor.shape[0]
        self._check_rows(rows)
        if rows == self.batch_size:
            return tensor
        padding = torch.full((self.batch_size - rows, *tensor.shape[1:]), fill, dtype=tensor.dtype)
        return torch.cat([tensor, padding])

    def _next_token_logits(self, output: torch.Tensor) -> NextTokenLogits:
        """A program's output rows as logits: its own, or those the head computes from it."""
        if self.head is None:
            return NextTokenLogits.of(output)
        return self.head.next_token_logits(output)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> NextTokenLogits:
        """Logits `[rows, V]` of each prompt's last token, computed as far as they are read;
        fills cache rows 0..rows-1.

        Each prompt runs alone, in the smallest bucket that holds it, into its own cache
        row: its numbers are the same whichever prompts share the batch (and a request can
        join a batch being decoded).
        """
        self._check_rows(input_ids.shape[0])
        outputs = []
        for row, (ids, mask) in enumerate(zip(input_ids, attention_mask, strict=True)):
            bucket = self.bucket_for(int(mask.sum()))
            ids, mask = left_align(ids[None], mask[None], self.pad_token_id, bucket)
            outputs.append(self.engine.prefill(ids, mask, torch.tensor([row])))
        return self._next_token_logits(torch.cat(outputs))

    def decode(self, input_ids: torch.Tensor, positions: torch.Tensor) -> NextTokenLogits:
        """Logits `[rows, V]` for one new token per row at `positions`, computed as far as
        they are read; updates the caches."""
        rows = input_ids.shape[0]
        if int(positions.max()) >= self.sequence_length:
            raise ValueError(
                f"Position {int(positions.max())} is beyond the compiled sequence_length="
                f"{self.sequence_length}."
            )
        ids = self._pad_batch(input_ids, self.pad_token_id)
        return self._next_token_logits(
            self.engine.decode(ids, self._pad_batch(positions, 0))[:rows]
        )
