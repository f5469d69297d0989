"""Speed of the compiled Gemma-3 270M against transformers, in the same process and run.

    python scripts/benchmark.py [--dtype float32 bfloat16] [--batch-sizes 1 4]
                                [--prompt-lengths 32 512 2000] [--sequence-length N]
                                [--new-tokens 32] [--tp-degrees 1 2]
                                [--repeats 3] [--decode-scaling 512 4096] [--json OUT]

For each dtype, batch size and tensor-parallel degree: export (timed; a compile-cache
hit is reported as such), reload in this process (timed), then alternately run
transformers (same dtype, its default sdpa attention and dynamic cache) and our model,
`--repeats` times, and report medians: time to first token per prompt length, decode
ms/token (greedy, and sampled with Gemma-3's recommended top_k=64, top_p=0.95), tokens/s,
and the ratio ours/transformers. The memory-bandwidth floor is measured in the same run:
a decode step that computes every logit must read every weight once, so `weights bytes /
bandwidth` is the fastest it can be. Our greedy steps and top-k sampling steps read the
int8 screen of the head instead of the head itself (`optimum_gemma3.runtime.head`), so ours is
also shown against the bytes it must read; the table shows what fraction of each floor
each side reaches.
`--decode-scaling` exports decode programs for several sequence lengths and times a step
at the same context, to show what a longer compiled cache costs a step.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).parent))
from prepare_270m import ensure_checkpoint  # noqa: E402

from optimum_gemma3 import Gemma3NeuronModelForCausalLM  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Gemma-3's recommended sampling (its instruction-tuned checkpoints' generation_config).
SAMPLING = {"do_sample": True, "top_k": 64, "top_p": 0.95}
logger = logging.getLogger("benchmark")


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Read bandwidth with the benchmark's thread count: a full reduction over a big buffer."""
    data = torch.ones(size_mb * 2**20 // 4, dtype=torch.float32)
    data.sum()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / min(times) / 1e9


def prompt_batch(length: int, batch: int) -> dict:
    generator = torch.Generator().manual_seed(length)
    ids = torch.randint(1000, 200000, (batch, length), generator=generator)
    ids[:, 0] = 2
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def fixed_length(new_tokens: int) -> dict:
    """generate() arguments for exactly `new_tokens` tokens whatever is drawn: no EOS.

    Not `min_new_tokens`: its processor builds a vocabulary-wide EOS mask on every step
    (several percent of a 270M decode step, on both sides alike), which measures
    transformers' processor rather than either model, and which generation that stops at
    EOS never runs.
    """
    return {"max_new_tokens": new_tokens, "eos_token_id": None}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(generate, prompts: dict[int, dict], new_tokens: int) -> dict:
    """TTFT per prompt length (one new token), and greedy and sampled decode ms/token (the
    shortest prompt's run of `new_tokens + 1` tokens, less its TTFT)."""
    ttft = {n: timed(lambda p=p: generate(p, 1)) for n, p in prompts.items()}
    shortest = prompts[min(prompts)]

    def decode_ms(**sampling) -> float:
        first = timed(lambda: generate(shortest, 1, **sampling))
        total = timed(lambda: generate(shortest, new_tokens + 1, **sampling))
        return 1000 * (total - first) / new_tokens

    return {"ttft_s": ttft, "decode_ms": decode_ms(), "sampled_decode_ms": decode_ms(**SAMPLING)}


def run_config(args, model_dir, dtype_name, batch, tp_degree, bandwidth) -> dict:
    dtype = DTYPES[dtype_name]
    folder = args.workdir / f"{dtype_name}-b{batch}-tp{tp_degree}"
    longest = max(args.prompt_lengths)
    # One prefill bucket per prompt length, so TTFT measures exactly that prompt length.
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        model_dir,
        batch_size=batch,
        sequence_length=args.sequence_length or longest + args.new_tokens + 8,
        max_context_length=longest,
        torch_dtype=dtype_name,
        instance_type="cpu",
        context_encoding_buckets=sorted(args.prompt_lengths),
        tensor_parallel_size=tp_degree,
    )
    process = psutil.Process()
    rss = process.memory_info().rss
    export_s = timed(
        lambda: Gemma3NeuronModelForCausalLM.export(model_dir, config).save_pretrained(folder)
    )
    start = time.perf_counter()
    ours = Gemma3NeuronModelForCausalLM.from_pretrained(folder)
    reload_s = time.perf_counter() - start
    # Tensor-parallel ranks are child processes: their memory is ours too.
    ranks_rss = sum(child.memory_info().rss for child in process.children(recursive=True))
    ours_rss = process.memory_info().rss - rss + ranks_rss
    rss = process.memory_info().rss
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    hf_rss = process.memory_info().rss - rss

    def ours_generate(p, n, do_sample=False, **sampling):
        return ours.generate(**p, **fixed_length(n), do_sample=do_sample, **sampling)

    def hf_generate(p, n, do_sample=False, **sampling):
        with torch.inference_mode():
            return reference.generate(**p, **fixed_length(n), do_sample=do_sample, **sampling)

    prompts = {n: prompt_batch(n, batch) for n in args.prompt_lengths}
    ours_generate(prompts[min(prompts)], 2)  # warm-up both
    hf_generate(prompts[min(prompts)], 2)
    runs = {"ours": [], "transformers": []}
    for _ in range(args.repeats):  # alternate, so drift affects both sides alike
        runs["transformers"].append(measure(hf_generate, prompts, args.new_tokens))
        runs["ours"].append(measure(ours_generate, prompts, args.new_tokens))
    folder = ours.runtime.folder
    weights_bytes = sum(
        (folder / name).stat().st_size
        for name in ours.neuron_config.artifact_files
        if name.endswith(".safetensors")
    )
    floor_ms = 1000 * weights_bytes / (bandwidth * 1e9)
    read_bytes = weights_bytes
    head = ours.runtime.head
    if head is not None and head.screen is not None:
        read_bytes += sum(t.nbytes for t in head.screen) - head.weight.nbytes
    read_floor_ms = 1000 * read_bytes / (bandwidth * 1e9)
    ours.runtime.close()  # stops tensor-parallel rank processes before the next config
    result = {
        "dtype": dtype_name,
        "batch": batch,
        "tp_degree": tp_degree,
        "export_s": export_s,
        "reload_s": reload_s,
        "rss_mb": {"ours": ours_rss / 2**20, "transformers": hf_rss / 2**20},
        "floor_ms": floor_ms,
        "read_floor_ms": read_floor_ms,
    }
    for side, measurements in runs.items():
        decode = statistics.median(m["decode_ms"] for m in measurements)
        result[side] = {
            "decode_ms": decode,
            "sampled_decode_ms": statistics.median(m["sampled_decode_ms"] for m in measurements),
            "tokens_per_s": 1000 * batch / decode,
            "ttft_s": {
                n: statistics.median(m["ttft_s"][n] for m in measurements)
                for n in args.prompt_lengths
            },
            "floor_fraction": floor_ms / decode,
        }
    result["ours"]["read_floor_fraction"] = read_floor_ms / result["ours"]["decode_ms"]
    return result


def full_decode_step(runtime, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return runtime.decode(ids, positions).full()


def decode_scaling(args, model_dir, context: int = 256) -> dict[int, float]:
    """Decode ms/step at the same context for programs compiled with different cache lengths."""
    times = {}
    for length in args.decode_scaling:
        config = Gemma3NeuronModelForCausalLM.get_neuron_config(
            model_dir,
            batch_size=1,
            sequence_length=length,
            max_context_length=128,
            context_encoding_buckets=[128],
            instance_type="cpu",
        )
        runtime = Gemma3NeuronModelForCausalLM.export(model_dir, config).runtime
        # Every logit, as the step's cost before it was split from the head.
        step = functools.partial(
            full_decode_step, runtime, torch.tensor([[1000]]), torch.tensor([context])
        )
        with torch.inference_mode():
            step()
            steps = [timed(step) for _ in range(10)]
        times[length] = 1000 * statistics.median(steps)
    return times


def print_table(results: list[dict], bandwidth: float) -> None:
    print(
        f"\nmachine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, read bandwidth {bandwidth:.1f} GB/s"
    )
    for r in results:
        o, t = r["ours"], r["transformers"]
        print(
            f"\n{r['dtype']}, batch {r['batch']}, tp {r['tp_degree']}: export "
            f"{r['export_s']:.0f} s, reload {r['reload_s']:.2f} s, RSS ours "
            f"{r['rss_mb']['ours']:.0f} MB / transformers "
            f"{r['rss_mb']['transformers']:.0f} MB, floor {r['floor_ms']:.1f} ms/step"
        )
        print(f"  {'metric':<22}{'transformers':>14}{'ours':>10}{'speed-up':>10}")
        for n in o["ttft_s"]:
            print(
                f"  {f'TTFT {n} tokens (s)':<22}{t['ttft_s'][n]:>14.3f}{o['ttft_s'][n]:>10.3f}"
                f"{t['ttft_s'][n] / o['ttft_s'][n]:>9.2f}x"
            )
        print(
            f"  {'decode (ms/token)':<22}{t['decode_ms']:>14.1f}{o['decode_ms']:>10.1f}"
            f"{t['decode_ms'] / o['decode_ms']:>9.2f}x"
        )
        t_sampled, o_sampled = t["sampled_decode_ms"], o["sampled_decode_ms"]
        print(
            f"  {'sampled (ms/token)':<22}{t_sampled:>14.1f}{o_sampled:>10.1f}"
            f"{t_sampled / o_sampled:>9.2f}x  (top_k 64, top_p 0.95)"
        )
        print(f"  {'tokens/s':<22}{t['tokens_per_s']:>14.1f}{o['tokens_per_s']:>10.1f}")
        floor = f"{t['floor_fraction']:>13.0%}{o['floor_fraction']:>10.0%}"
        print(f"  {'of bandwidth floor':<22}{floor}")
        if r["read_floor_ms"] != r["floor_ms"]:
            print(
                f"  {'of what ours reads':<22}{'':>14}{o['read_floor_fraction']:>10.0%}"
                f"  (floor {r['read_floor_ms']:.1f} ms: the head's int8 screen, not the head)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["float32"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    parser.add_argument("--prompt-lengths", nargs="+", type=int, default=[32, 512, 2000])
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=None,
        help="compiled length (default: longest prompt + new tokens + 8)",
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--tp-degrees",
        nargs="+",
        type=int,
        default=[1],
        help="tensor_parallel_size values (rank processes share this machine's cores)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-scaling", nargs="*", type=int, default=[])
    parser.add_argument("--workdir", type=Path, default=Path("benchmarks"))
    parser.add_argument("--json", type=Path, default=Path("benchmarks/benchmark.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(os.cpu_count() or 1)
    args.workdir.mkdir(parents=True, exist_ok=True)

    model_dir = ensure_checkpoint()
    bandwidth = memory_bandwidth_gbs()
    results = [
        run_config(args, model_dir, d, b, tp, bandwidth)
        for d in args.dtype
        for b in args.batch_sizes
        for tp in args.tp_degrees
    ]
    print_table(results, bandwidth)
    report = {"bandwidth_gbs": bandwidth, "threads": torch.get_num_threads(), "runs": results}
    if args.decode_scaling:
        scaling = decode_scaling(args, model_dir)
        report["decode_scaling_ms"] = scaling
        print(
            "\ndecode ms/step at context 256 by compiled sequence_length: "
            + ", ".join(f"{length}: {ms:.1f}" for length, ms in scaling.items())
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
