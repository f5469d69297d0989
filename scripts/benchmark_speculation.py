"""Greedy decode speed of the real Gemma-3 270M: ours plain and speculative, and the peers.

    python scripts/benchmark_speculation.py [--speculation-length 4 7] [--new-tokens 64]
                                            [--repeats 3] [--peers openvino-int4 ...]
                                            [--json OUT]

Batch 1, greedy, bf16, 2 threads. Prompts: general prose (the accuracy prompts' first
sentences) and an input-grounded one (a source file, then "the same file again": the
continuation copies the input, where prompt lookup drafts well). For every prompt and
repeat, alternately: our plain greedy decoding, ours with prompt-lookup drafts and with
the self-draft (the model's int8 copy; one export per `--speculation-length`: the verify
program's width is fixed at export), and each peer (`scripts/peers.py`: OpenVINO through
optimum-intel, llama.cpp on the GGUF file the 270M comes from, each in its own virtual
environment that script makes). Reported per engine and prompt kind, medians: time to
first token, decode ms/token
((total - TTFT) / (new tokens - 1)), the ratio to our plain decoding, the acceptance rate
of drafts, the fraction of the bandwidth floor (the bytes a plain bf16 step must read, the
layers and the head's int8 screen, over the highest read bandwidth probed before and
after the runs, since it moves with the machine's other tenants: above 1
means fewer reads than one per token), and the first token where each engine's output
leaves transformers' fp32 greedy tokens (none: identical). The speculative tokens must
equal our plain greedy tokens; the script fails otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).parent))
from benchmark import memory_bandwidth_gbs  # noqa: E402
from prepare_270m import ensure_checkpoint  # noqa: E402

from optimum_gemma3 import Gemma3NeuronModelForCausalLM  # noqa: E402

GROUNDED_SOURCE = Path(__file__).resolve().parents[1] / "optimum_gemma3" / "runtime" / "loop.py"
PROSE = [
    "The history of the printing press begins in",
    "Photosynthesis is the process by which plants",
    "The first thing to know about learning a new language is",
]


def prompts(tokenizer) -> dict[str, list[list[int]]]:
    """Token ids of each prompt kind (every engine gets the same ids)."""
    code = GROUNDED_SOURCE.read_text()[:1500]
    grounded = (
        f"Here is a Python file:\n```python\n{code}\n```\n"
        "Here is the same file again, unchanged:\n```python\n"
    )
    return {
        "prose": [tokenizer(text).input_ids for text in PROSE],
        "input-grounded": [tokenizer(grounded).input_ids],
    }


def first_difference(tokens: list[int], reference: list[int]) -> int | None:
    """The index of the first new token that differs from `reference` (None: identical)."""
    return next(
        (i for i, (a, b) in enumerate(zip(tokens, reference, strict=False)) if a != b), None
    )


def time_ours(model, ids: list[int], new_tokens: int, **options) -> tuple[float, float, list[int]]:
    """(TTFT s, decode ms/token, new token ids) of one greedy generation."""
    input_ids = torch.tensor([ids])
    greedy = dict(do_sample=False, min_new_tokens=new_tokens, **options)
    start = time.perf_counter()
    model.generate(input_ids, max_new_tokens=1, **greedy | {"min_new_tokens": 1})
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(input_ids, max_new_tokens=new_tokens, **greedy)
    total = time.perf_counter() - start
    return ttft, (total - ttft) * 1000 / (new_tokens - 1), out[0, len(ids) :].tolist()


def reference_tokens(checkpoint: Path, all_prompts, new_tokens: int) -> dict:
    """transformers fp32 greedy tokens of every prompt (EOS ignored)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    tokens = {}
    with torch.inference_mode():
        for kind, kind_prompts in all_prompts.items():
            for i, ids in enumerate(kind_prompts):
                out = model.generate(
                    torch.tensor([ids]),
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    do_sample=False,
                )
                tokens[kind, i] = out[0, len(ids) :].tolist()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speculation-length", type=int, nargs="+", default=[4, 7])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peers", nargs="*", default=None, help="default: every peer variant")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoint = ensure_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    all_prompts = prompts(tokenizer)
    longest = max(len(ids) for kind in all_prompts.values() for ids in kind)
    bucket = 1 << (longest - 1).bit_length()

    lengths = sorted(set(args.speculation_length))
    models = {}
    for k in lengths:  # the same prefill and decode programs: only verify's width differs
        start = time.perf_counter()
        models[k] = Gemma3NeuronModelForCausalLM.from_pretrained(
            checkpoint,
            export=True,
            instance_type="cpu",
            torch_dtype="bfloat16",
            batch_size=1,
            sequence_length=bucket + args.new_tokens + max(lengths) + 8,
            context_encoding_buckets=sorted({64, bucket}),
            speculation_length=k,
            draft_quantization_dtype="int8",
        )
        print(f"export (speculation_length={k}): {time.perf_counter() - start:.0f} s", flush=True)
    model = models[lengths[0]]
    reference = reference_tokens(checkpoint, all_prompts, args.new_tokens)

    peers = []
    if args.peers is None or args.peers:
        from peers import PEER_VARIANTS, ensure_peer_envs, run_peer

        peers = list(PEER_VARIANTS if args.peers is None else args.peers)
        ensure_peer_envs(sorted({variant.split("-")[0] for variant in peers}))

    bandwidths = [memory_bandwidth_gbs()]
    speculative = {}  # engine: (speculation_length, its generate() options)
    for k in lengths:
        speculative[f"ours bf16 + prompt lookup (k={k})"] = k, {"prompt_lookup_num_tokens": k}
        self_draft = {"self_draft": True, "num_assistant_tokens": k}
        speculative[f"ours bf16 + self-draft int8 (k={k})"] = k, self_draft
    engines = ["ours bf16", *speculative, *peers]
    runs = {(engine, kind): [] for engine in engines for kind in all_prompts}
    tokens = {}
    acceptance = {(engine, kind): [0, 0] for engine in speculative for kind in all_prompts}
    for repeat in range(args.repeats):
        for kind, kind_prompts in all_prompts.items():
            for i, ids in enumerate(kind_prompts):
                ttft, ms, plain = time_ours(model, ids, args.new_tokens)
                runs[engines[0], kind].append((ttft, ms))
                tokens[engines[0], kind, i] = plain
                for engine, (k, options) in speculative.items():
                    ttft, ms, drafted = time_ours(models[k], ids, args.new_tokens, **options)
                    runs[engine, kind].append((ttft, ms))
                    stats = models[k].speculation_stats
                    acceptance[engine, kind][0] += stats.accepted
                    acceptance[engine, kind][1] += stats.drafted
                    if drafted != plain:
                        raise SystemExit(f"{engine}: tokens differ from plain greedy, {kind} {i}")
                    tokens[engine, kind, i] = plain
            for variant in peers:
                result = run_peer(variant, kind_prompts, args.new_tokens, 1, args.threads)
                for i, (run,) in enumerate(result["runs"]):
                    runs[variant, kind].append((run["ttft_s"], run["ms_per_token"]))
                    tokens[variant, kind, i] = result["tokens"][i]
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    bandwidths.append(memory_bandwidth_gbs())
    bandwidth = max(bandwidths)  # the lowest floor: the fractions err low, not high
    weights = model.runtime.engine.weights
    layer_bytes = sum(t.numel() * t.element_size() for n, t in weights.items() if "layers." in n)
    head = model.runtime.head.weight
    floor_ms = (layer_bytes + head.numel()) / (bandwidth * 1e9) * 1e3  # int8 screen: 1 B each
    rows = []
    for kind in all_prompts:
        plain_ms = statistics.median(ms for _, ms in runs[engines[0], kind])
        for engine in engines:
            ttft = statistics.median(t for t, _ in runs[engine, kind])
            ms = statistics.median(m for _, m in runs[engine, kind])
            diffs = [
                first_difference(tokens[engine, kind, i], reference[kind, i])
                for i in range(len(all_prompts[kind]))
            ]
            accepted, drafted = acceptance.get((engine, kind), (0, 0))
            rows.append(
                {
                    "engine": engine,
                    "prompts": kind,
                    "ttft_s": ttft,
                    "ms_per_token": ms,
                    "vs_plain": ms / plain_ms,
                    "acceptance": accepted / drafted if drafted else None,
                    "floor_fraction": floor_ms / ms,
                    "first_difference_vs_fp32": diffs,
                }
            )
    print(
        f"\nReal Gemma-3 270M, batch 1, greedy, {args.new_tokens} new tokens, {args.threads} "
        f"threads, medians of {args.repeats}; bandwidth {bandwidths[0]:.1f} GB/s before the runs, "
        f"{bandwidths[1]:.1f} after; plain bf16 floor at the higher "
        f"{floor_ms:.1f} ms/token"
    )
    print(
        "| engine | prompts | TTFT s | ms/token | vs ours plain | acceptance | of floor "
        "| leaves fp32 tokens at |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        accept = "" if r["acceptance"] is None else f"{r['acceptance']:.0%}"
        diffs = ", ".join("never" if d is None else str(d) for d in r["first_difference_vs_fp32"])
        print(
            f"| {r['engine']} | {r['prompts']} | {r['ttft_s']:.3f} | {r['ms_per_token']:.1f} "
            f"| {r['vs_plain']:.2f}x | {accept} | {r['floor_fraction']:.2f} | {diffs} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
