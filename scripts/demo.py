"""The main job on the real Gemma-3 270M: convert (once), build the graphs, generate.

    python scripts/demo.py [--prompt TEXT] [--max-new-tokens N] [--dtype float32|bfloat16]

Prints the generated text, prefill time and decode ms/token.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
from prepare_270m import ensure_checkpoint
from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from optimum_gemma3.generation import greedy_generate
from optimum_gemma3.modeling import Gemma3Decoder
from optimum_gemma3.weights import load_weights

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    model_dir = ensure_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    generation_config = GenerationConfig.from_pretrained(model_dir)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    prompt_len = inputs.input_ids.shape[1]
    decoder = Gemma3Decoder(
        AutoConfig.from_pretrained(model_dir),
        1,
        prompt_len + args.max_new_tokens,
        DTYPES[args.dtype],
    )
    load_weights(decoder, model_dir)

    timings = {}

    def timed(name, fn):
        def wrapper(*a):
            start = time.perf_counter()
            out = fn(*a)
            timings.setdefault(name, []).append(time.perf_counter() - start)
            return out

        return wrapper

    with torch.inference_mode():
        out = greedy_generate(
            timed("prefill", decoder.prefill),
            timed("decode", decoder.decode),
            inputs.input_ids,
            inputs.attention_mask,
            args.max_new_tokens,
            eos_token_id=generation_config.eos_token_id,
            pad_token_id=generation_config.pad_token_id,
        )
    print(tokenizer.decode(out.sequences[0], skip_special_tokens=True))
    decode = timings.get("decode", [float("nan")])
    print(
        f"\nmodel: {model_dir} ({args.dtype}), prompt {prompt_len} tokens, "
        f"{out.sequences.shape[1] - prompt_len} new tokens"
    )
    print(
        f"prefill: {1000 * timings['prefill'][0]:.1f} ms, "
        f"decode: {1000 * sum(decode) / len(decode):.1f} ms/token"
    )


if __name__ == "__main__":
    main()
