"""The main job on the real Gemma-3 270M: convert (once), export, reload, generate.

    python scripts/demo.py [--prompt TEXT] [--max-new-tokens N] [--dtype float32|bfloat16]
                           [--sequence-length N] [--output DIR]

Uses optimum-neuron's own entry point (`NeuronModelForCausalLM.from_pretrained(...,
export=True)`) with the plugin imported, saves the compiled folder, reloads it as a user
would, and prints the generated text with prefill and decode speed. Compiled programs are
cached, so a second run skips compilation.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

import torch
from prepare_270m import ensure_checkpoint
from transformers import AutoTokenizer

import optimum_gemma3  # noqa: F401  (registers Gemma-3 with optimum-neuron)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--sequence-length", type=int, default=256)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/gemma-3-270m-cpu"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    # After `import optimum_gemma3`, which imports optimum-neuron without its CPU-only
    # device-probe warnings (see optimum_gemma3/quiet.py).
    from optimum.neuron import NeuronModelForCausalLM

    model_dir = ensure_checkpoint()
    start = time.perf_counter()
    model = NeuronModelForCausalLM.from_pretrained(
        model_dir,
        export=True,
        batch_size=1,
        sequence_length=args.sequence_length,
        torch_dtype=args.dtype,
        instance_type="cpu",
    )
    model.save_pretrained(args.output)
    export_s = time.perf_counter() - start

    start = time.perf_counter()
    model = NeuronModelForCausalLM.from_pretrained(args.output)
    reload_s = time.perf_counter() - start
    tokenizer = AutoTokenizer.from_pretrained(args.output)
    inputs = tokenizer(args.prompt, return_tensors="pt")
    prompt_len = inputs.input_ids.shape[1]

    first = time.perf_counter()
    model.generate(**inputs, max_new_tokens=1)
    ttft = time.perf_counter() - first
    start = time.perf_counter()
    output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    total = time.perf_counter() - start
    new_tokens = output.shape[1] - prompt_len

    print("\n" + tokenizer.decode(output[0], skip_special_tokens=True))
    print(f"\nmodel: {model_dir} ({args.dtype}) -> {args.output}")
    print(f"export (compile or compile cache) {export_s:.1f} s, reload {reload_s:.2f} s")
    print(
        f"prompt {prompt_len} tokens: first token {1000 * ttft:.0f} ms; {new_tokens} new "
        f"tokens at {1000 * (total - ttft) / max(new_tokens - 1, 1):.1f} ms/token"
    )


if __name__ == "__main__":
    main()
