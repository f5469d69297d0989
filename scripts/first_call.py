"""The first request after loading against the ones after it: time to first token of each.

    python scripts/first_call.py [--model DIR] [--prompt TEXT] [--calls N] [--threads N]
                                [--skip-warm-up] [--evict-page-cache]

Loads a compiled folder (by default the one `scripts/demo.py` writes; exported here from
the real Gemma-3 270M if missing), then times `generate(max_new_tokens=1)` on the same
prompt `--calls` times. Loading warms the programs up, so the first call should be as fast
as the others; `--skip-warm-up` loads without it, to show the work it moves to load time.
Each run starts a fresh process, so the first call's costs are all still there;
`--evict-page-cache` also drops the folder's files from the page cache first, as after a
reboot or on a machine that just downloaded the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from prepare_270m import ensure_checkpoint
from transformers import AutoTokenizer

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.runtime.engine import Gemma3Runtime

DEFAULT_FOLDER = Path("benchmarks/gemma-3-270m-cpu")


def compiled_folder(folder: Path) -> Path:
    """`folder` if it holds a compiled model, else the real 270M exported into it as the demo
    does (batch 1, 256 tokens, fp32)."""
    if not (folder / "neuron_config.json").is_file():
        config = Gemma3NeuronModelForCausalLM.get_neuron_config(
            ensure_checkpoint(), batch_size=1, sequence_length=256, instance_type="cpu"
        )
        model = Gemma3NeuronModelForCausalLM.export(ensure_checkpoint(), config)
        model.save_pretrained(folder)
    return folder


def evict_page_cache(folder: Path) -> None:
    """Ask the kernel to drop these files' cached pages (theirs only), so loading reads them."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_FOLDER)
    parser.add_argument("--prompt", default="def fibonacci(n):")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-warm-up", action="store_true")
    parser.add_argument("--evict-page-cache", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = compiled_folder(args.model)
    if args.skip_warm_up:
        Gemma3Runtime._warm_up = lambda self: None  # this process only
    if args.evict_page_cache:
        evict_page_cache(folder)

    start = time.perf_counter()
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    load_s = time.perf_counter() - start
    inputs = AutoTokenizer.from_pretrained(folder)(args.prompt, return_tensors="pt")
    ttfts = []
    for _ in range(args.calls):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1)
        ttfts.append(time.perf_counter() - start)

    warm_up = "skipped" if args.skip_warm_up else "at load"
    cache = ", files evicted from the page cache" if args.evict_page_cache else ""
    print(f"{folder} ({model.neuron_config.torch_dtype}), warm-up {warm_up}{cache}")
    print(f"load {load_s:.2f} s; prompt {inputs.input_ids.shape[1]} tokens")
    print(
        f"TTFT first call {1000 * ttfts[0]:.0f} ms; later calls median "
        f"{1000 * statistics.median(ttfts[1:]):.0f} ms "
        f"({', '.join(f'{1000 * t:.0f}' for t in ttfts[1:])})"
    )


if __name__ == "__main__":
    main()
