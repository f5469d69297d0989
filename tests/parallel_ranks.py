"""Rank processes for tests that run the sharded graphs eagerly on a gloo process group.

The compiled path (runtime-managed workers) is exercised end to end in
tests/test_tensor_parallel.py; these ranks check the sharding math itself on every
kv-head layout without compiling a program per configuration.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import AutoConfig

from optimum_gemma3.graphs import Gemma3Decoder, text_config
from optimum_gemma3.graphs.parallel import shard_state_dict
from optimum_gemma3.runtime.loop import greedy_generate
from optimum_gemma3.weights import load_decoder_state_dict


def greedy_rank(
    rank: int,
    degree: int,
    checkpoint: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    new_tokens: int,
    sequence_length: int,
    out: str,
) -> None:
    """One rank of a `degree`-way sharded greedy generation; rank 0 writes the tokens."""
    torch.set_num_threads(1)
    store = dist.FileStore(str(Path(out).with_suffix(".store")), degree)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=degree)
    try:
        config = text_config(AutoConfig.from_pretrained(checkpoint))
        decoder = Gemma3Decoder(config, ids.shape[0], sequence_length, tp_degree=degree)
        full = load_decoder_state_dict(checkpoint, torch.float32, config.tie_word_embeddings)
        decoder.load_state_dict(shard_state_dict(full, config, degree)[rank])
        with torch.inference_mode():
            tokens = greedy_generate(decoder.prefill, decoder.decode, ids, mask, new_tokens)
        if rank == 0:
            save_file({"tokens": tokens.sequences.contiguous()}, out)
    finally:
        dist.destroy_process_group()
