"""Cold export time of the real Gemma-3 270M, at the default export options or others.

    python scripts/benchmark_export.py [--sequence-length N] [--dtype bfloat16]
                                       [--buckets 128 512 ...] [--speculation-length K]

"Cold": this package's compile cache and Inductor's caches are empty (fresh temporary
folders), so every program is traced and compiled; the C++ kernels are built (or found)
before the clock starts, as they are once per torch version and host. Prints the export's
wall time, the programs it made and their sizes, then reloads the folder and times one
prefill per prompt length (checking its next-token logits against transformers') and a
few decode steps, so a faster export is seen next to what it runs like.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare_270m import ensure_checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequence-length", type=int, default=None, help="default: the API's")
    parser.add_argument("--dtype", default=None, help="default: the API's (the checkpoint's)")
    parser.add_argument("--buckets", nargs="*", type=int, default=None)
    parser.add_argument("--speculation-length", type=int, default=0)
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 500, 2000])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    checkpoint = ensure_checkpoint()
    scratch = Path(tempfile.mkdtemp(prefix="cold-export-"))
    # Both caches empty: set before torch reads them.
    os.environ["OPTIMUM_GEMMA3_CACHE_DIR"] = str(scratch / "compile-cache")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(scratch / "inductor")
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_gemma3 import Gemma3NeuronModelForCausalLM
    from optimum_gemma3.graphs import kernels

    kernels.load()  # built once per torch version and host: not part of an export
    options = {"batch_size": 1, "instance_type": "cpu"}
    if args.sequence_length:
        options["sequence_length"] = args.sequence_length
    if args.dtype:
        options["torch_dtype"] = args.dtype
    if args.buckets:
        options["context_encoding_buckets"] = args.buckets
    if args.speculation_length:
        options["speculation_length"] = args.speculation_length
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(checkpoint, **options)
    start = time.perf_counter()
    model = Gemma3NeuronModelForCausalLM.export(checkpoint, config)
    folder = model.save_pretrained(scratch / "model")
    seconds = time.perf_counter() - start
    nc = model.neuron_config
    print(
        f"\ncold export: {seconds:.1f} s (sequence_length {nc.sequence_length}, "
        f"{nc.dtype_name}, buckets {nc.context_encoding_buckets}, "
        f"speculation_length {nc.speculation_length}, {torch.get_num_threads()} threads)"
    )
    for path in sorted((folder / "compiled").iterdir()):
        print(f"  {path.name}: {path.stat().st_size / 2**20:.1f} MiB")
    del model
    model = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=nc.torch_dtype)
    for length in args.prompt_lengths:
        if length > nc.context_encoding_buckets[-1]:
            continue
        ids = torch.randint(3, 1000, (1, length))
        times = []
        for _ in range(3):
            begin = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=1,
                output_logits=True,
                return_dict_in_generate=True,
            )
            times.append(time.perf_counter() - begin)
        with torch.inference_mode():
            expected = reference(ids).logits[:, -1].float()
        error = (out.logits[0] - expected).abs().max().item()
        same = bool(out.logits[0].argmax(-1) == expected.argmax(-1))
        print(
            f"  prefill {length} tokens: {min(times) * 1000:.0f} ms (best of 3); logits vs "
            f"transformers: max |diff| {error:.2e}, same next token: {same}"
        )
    ids = torch.randint(3, 1000, (1, 32))
    begin = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=65, min_new_tokens=65)
    print(f"  32-token prompt + 64 decode steps: {(time.perf_counter() - begin) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
