"""KV-cache memory of the compiled graphs vs full-length caches, for Gemma-3 1b and 27b.

    python scripts/memory_report.py [--dtype bfloat16] [--batch-size 1]

Cache shapes are read from the decoder our exporter builds (on the meta device, so
nothing is allocated): sliding layers hold `sliding_window` slots, full-attention layers
`sequence_length`. The comparison is a full-length cache on every layer, as ports that
ignore the window allocate.
"""

from __future__ import annotations

import argparse

import torch
from transformers import Gemma3TextConfig

from optimum_gemma3.graphs import Gemma3Decoder
from optimum_gemma3.graphs.program import cache_tensors

# The published text configs (sizes from the numerics doc); the rest are Gemma3TextConfig
# defaults, whose layer pattern (5 sliding : 1 full) is what the checkpoints use.
CONFIGS = {
    "1b": dict(
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        sliding_window=512,
        vocab_size=262144,
        max_position_embeddings=32768,
    ),
    "27b": dict(
        hidden_size=5376,
        intermediate_size=21504,
        num_hidden_layers=62,
        num_attention_heads=32,
        num_key_value_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
        sliding_window=1024,
        vocab_size=262208,
        max_position_embeddings=131072,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}


def cache_bytes(config: Gemma3TextConfig, sequence_length: int, batch: int, dtype) -> int:
    with torch.device("meta"):
        decoder = Gemma3Decoder(config, batch, sequence_length, dtype)
    return sum(t.numel() * t.element_size() for t in cache_tensors(decoder).values())


def full_length_bytes(config: Gemma3TextConfig, sequence_length: int, batch: int, dtype) -> int:
    per_layer = 2 * batch * config.num_key_value_heads * sequence_length * config.head_dim
    return per_layer * config.num_hidden_layers * torch.finfo(dtype).bits // 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=1)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(f"KV cache per sequence batch of {args.batch_size}, {args.dtype}")
    print(f"{'model':<6}{'context':>8}{'window-sized':>15}{'full-length':>14}{'ratio':>8}")
    for name, fields in CONFIGS.items():
        config = Gemma3TextConfig(**fields)
        for context in (8192, 32768):
            ours = cache_bytes(config, context, args.batch_size, dtype)
            full = full_length_bytes(config, context, args.batch_size, dtype)
            print(
                f"{name:<6}{context:>8}{ours / 2**20:>12.0f} MB{full / 2**20:>11.0f} MB"
                f"{ours / full:>8.1%}"
            )


if __name__ == "__main__":
    main()
