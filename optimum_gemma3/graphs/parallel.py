"""Tensor parallelism: how the decoder's weights split across ranks, and the collectives.

Megatron's layout, as neuronx-distributed's parallel layers implement it on Neuron:
- q/k/v and MLP gate/up are column-parallel (each rank owns whole heads / a slice of
  the intermediate features); o_proj and down_proj are row-parallel and all-reduce their
  partial sums, so norms and residuals see the full hidden state on every rank;
- the embedding and the (tied) head are vocab-parallel: each rank owns a contiguous slice
  of the vocabulary, looks up only its ids (the others read as zero, and an all-reduce
  adds the one real row) and computes only its logits, gathered at the end. The
  262144-row table is most of a small Gemma-3's bytes, so replicating it would leave
  every rank streaming all of it per token; split, each streams 1/tp of it;
- kv heads are split when there are at least as many as ranks, and replicated otherwise
  (270m and 1b have one kv head): every rank keeps the kv head its query heads read.

The collectives are torch's functional collectives over the default process group, so a
traced graph holds them as ops (`_c10d_functional.all_reduce`, the only one used) that
compiled programs run on whatever process group the rank process has set up (gloo on CPU). The graph
itself is identical on every rank: the rank enters as a weight (`tensor_parallel_rank`,
like neuronx-distributed's SPMDRank), so one compiled program serves all ranks.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

RANK_NAME = "tensor_parallel_rank"


@dataclass(frozen=True)
class TensorParallelLayout:
    """Per-rank sizes of a Gemma-3 text config split over `degree` ranks."""

    degree: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def for_config(cls, config, degree: int) -> TensorParallelLayout:
        """The layout, or a ValueError naming what `degree` fails to divide."""
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if not _splits(config, degree):
            valid = [d for d in range(1, heads + 1) if _splits(config, d)]
            raise ValueError(
                f"tp_degree={degree} cannot split this model (num_attention_heads={heads}, "
                f"num_key_value_heads={kv_heads}, intermediate_size={config.intermediate_size}, "
                f"vocab_size={config.vocab_size}): the degree must divide the query heads, "
                "MLP width and vocabulary, and divide or be a multiple of the kv heads. "
                f"Valid degrees: {valid}."
            )
        return cls(
            degree=degree,
            num_heads=heads // degree,
            num_kv_heads=max(kv_heads // degree, 1),
            intermediate_size=config.intermediate_size // degree,
            vocab_size=config.vocab_size // degree,
        )


def _splits(config, degree: int) -> bool:
    kv_heads = config.num_key_value_heads
    sizes = (config.num_attention_heads, config.intermediate_size, config.vocab_size)
    kv_ok = kv_heads % degree == 0 or degree % kv_heads == 0
    return kv_ok and all(size % degree == 0 for size in sizes)


# Which checkpoint tensors split along which dim (the rest are replicated).
_COLUMN = ("q_proj.", "gate_proj.", "up_proj.", "embed_tokens.", "lm_head.")
_ROW = ("o_proj.weight", "down_proj.weight")
_KV = ("k_proj.", "v_proj.")


def shard_state_dict(
    state_dict: dict[str, torch.Tensor], config, degree: int
) -> list[dict[str, torch.Tensor]]:
    """Split a full decoder state dict into one state dict per rank (see module docstring)."""
    TensorParallelLayout.for_config(config, degree)  # refuses a degree that cannot split
    kv_heads = config.num_key_value_heads
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(degree)]
    for name, tensor in state_dict.items():
        if any(part in name for part in _KV) and kv_heads < degree:
            # Replicated kv heads: rank r keeps the head its query heads attend with.
            heads = tensor.unflatten(0, (kv_heads, -1))
            pieces = [heads[r * kv_heads // degree] for r in range(degree)]
        elif any(part in name for part in _COLUMN + _KV):
            pieces = tensor.chunk(degree, dim=0)
        elif name.endswith(_ROW):
            pieces = tensor.chunk(degree, dim=1)
        else:
            pieces = [tensor] * degree
        for shard, piece in zip(shards, pieces, strict=True):
            shard[name] = piece.contiguous()
    for rank, shard in enumerate(shards):
        shard[RANK_NAME] = torch.tensor([rank], dtype=torch.int32)
    return shards


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks of the default process group (row-parallel outputs)."""
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def gather_vocab(logits: torch.Tensor, rank: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every rank's vocab slice of `logits` in one `[..., vocab_size]` tensor, on every rank.

    Each rank places its slice at its offset in zeros and an all-reduce sums them: exact
    (each element is one rank's value plus zeros), and unlike an all-gather the traced op
    does not depend on the group size, which the one-rank tracing group cannot provide.
    """
    local = logits.shape[-1]
    columns = rank * local + torch.arange(local, device=logits.device)
    full = logits.new_zeros(*logits.shape[:-1], vocab_size).index_copy(-1, columns, logits)
    return outside_collective(all_reduce(full))


def outside_collective(x: torch.Tensor) -> torch.Tensor:
    """`x` in a buffer of its own, for a program output computed by a collective.

    Gloo's worker thread drops its reference to a collective's buffer after the call has
    returned. Were that buffer the program's output, Python would own it by then, the drop
    would need the GIL, and the rank's main thread holds the GIL inside its next program
    while its first collective waits for that worker's lock: both ranks wait forever.
    Inductor turns `clone()` and `copy_()` back into the buffer itself; a multiply by one is
    a kernel it keeps, and exact.
    """
    return x * 1


@contextlib.contextmanager
def tracing_process_group() -> Iterator[None]:
    """A one-rank gloo group to trace sharded graphs in, torn down afterwards.

    Tracing only needs shapes and the collective ops, not peers; the traced program
    refers to the default group, which each rank process sets up before running it.
    """
    if dist.is_initialized():
        raise RuntimeError(
            "Exporting a tensor-parallel model needs a process of its own: torch.distributed "
            "is already initialized in this one. Export outside the distributed job."
        )
    with tempfile.TemporaryDirectory() as folder:
        store = dist.FileStore(str(Path(folder) / "store"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
