"""Serving throughput and latency of the real Gemma-3 270M, against transformers.

    python scripts/benchmark_serving.py [--dtype bfloat16] [--batch-size 8]
        [--sequence-length 512] [--concurrency 1 4 8 16] [--requests 32]
        [--max-tokens 64] [--hf-requests 8] [--buckets 32 64 128 256 512] [--json OUT]

Exports the model (compile cache reused) and starts `python -m optimum_gemma3.serve` on
it in a process of its own. Then the same request mix (the prompts of
scripts/prompts/accuracy.jsonl in turn, completions and chats, greedy, each generating
exactly `--max-tokens` tokens: vLLM's `ignore_eos` generates through EOS; prompts
too long for `--sequence-length` are left out) is sent by
1, 4, 8 and 16 concurrent clients, each streaming (SSE) and sending its next request
when one ends. Per concurrency: aggregate generated tokens/s (all tokens / wall time),
time to first token p50/p95 and inter-token latency p50/p95 (gaps between a request's
streamed tokens), measured by the clients. After the server has stopped, transformers
(same dtype, in this process) answers requests of the mix one at a time.

Targets (bf16, batch_size 8), checked and printed: tokens/s at 8 clients >= 4x the
1-client rate and >= 10x transformers' rate; p95 inter-token latency at 8 clients <=
2.5x the 1-client decode step (its median inter-token latency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
from prepare_270m import ensure_checkpoint  # noqa: E402

from optimum_gemma3 import Gemma3NeuronModelForCausalLM  # noqa: E402

PROMPTS = REPO / "scripts" / "prompts" / "accuracy.jsonl"
MODEL_NAME = "gemma-3-270m"
TARGETS = {"speedup_vs_1_client": 4.0, "speedup_vs_transformers": 10.0, "itl_p95_vs_step": 2.5}


def export(args) -> Path:
    buckets = "-".join(map(str, args.buckets)) if args.buckets else "default"
    name = f"serving-{args.dtype}-b{args.batch_size}-s{args.sequence_length}-buckets-{buckets}"
    folder = REPO / "benchmarks" / name
    if (folder / "neuron_config.json").is_file():
        return folder
    model = Gemma3NeuronModelForCausalLM.from_pretrained(
        ensure_checkpoint(),
        export=True,
        batch_size=args.batch_size,
        sequence_length=args.sequence_length,
        torch_dtype=args.dtype,
        instance_type="cpu",
        context_encoding_buckets=args.buckets,
    )
    model.save_pretrained(folder)
    model.runtime.close()
    return folder


def request_mix(count: int, max_tokens: int, tokenizer, sequence_length: int) -> list[dict]:
    """`count` requests from the prompt file in turn (those whose prompt and `max_tokens`
    fit `sequence_length`): bodies for the two endpoints. Budgets cycle through 1/2, 1, 3/2
    of `max_tokens` (mean `max_tokens`): requests of one length would start and end in
    lockstep, which no real traffic does."""
    mix, entries = [], []
    for line in PROMPTS.read_text().splitlines():
        entry = json.loads(line)
        if "messages" in entry:
            ids = tokenizer.apply_chat_template(entry["messages"], add_generation_prompt=True)
        else:
            ids = tokenizer(entry["prompt"])["input_ids"]
        if len(ids) + max_tokens * 3 // 2 <= sequence_length:
            entries.append(entry)
    for index in range(count):
        entry = entries[index % len(entries)]
        budget = max_tokens * (index % 3 + 1) // 2
        body = {"model": MODEL_NAME, "max_tokens": budget, "ignore_eos": True}
        body.update(temperature=0, stream=True, stream_options={"include_usage": True})
        if "messages" in entry:
            body["messages"] = entry["messages"]
            mix.append({"path": "/v1/chat/completions", "body": body})
        else:
            mix.append({"path": "/v1/completions", "body": {**body, "prompt": entry["prompt"]}})
    return mix


def buckets_of(folder: Path) -> list[int]:
    return json.loads((folder / "neuron_config.json").read_text())["context_encoding_buckets"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, port: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "optimum_gemma3.serve", "--model", str(folder),
        "--served_model_name", MODEL_NAME, "--port", str(port), "--max_queue_size", "4096",
    ]  # fmt: skip
    quiet = subprocess.DEVNULL
    process = subprocess.Popen(command, cwd=REPO, stdout=quiet, stderr=quiet)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    raise SystemExit("the server did not come up in 10 minutes")


async def stream_one(client: httpx.AsyncClient, request: dict) -> dict:
    """Send one streamed request; the arrival time of each token-carrying chunk."""
    sent = time.perf_counter()
    arrivals, tokens = [], 0
    async with client.stream("POST", request["path"], json=request["body"]) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice.get("text") or (choice.get("delta") or {}).get("content"):
                    arrivals.append(time.perf_counter())
    return {"sent": sent, "arrivals": arrivals, "tokens": tokens}


async def run_clients(url: str, mix: list[dict], clients: int) -> tuple[list[dict], float]:
    queue = list(mix)
    results = []

    async def client_loop() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            while queue:
                results.append(await stream_one(client, queue.pop(0)))

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["arrivals"][0] - r["sent"] for r in results if r["arrivals"]]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:], strict=False)]
    tokens = sum(r["tokens"] for r in results)
    return {
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p95_s": percentile(ttft, 95),
        "itl_p50_s": percentile(gaps, 50),
        "itl_p95_s": percentile(gaps, 95),
    }


def transformers_rate(args, mix: list[dict]) -> dict:
    """transformers answering requests of the mix one at a time (greedy, through EOS)."""
    checkpoint = ensure_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, args.dtype)
    ).eval()
    requests = mix[: args.hf_requests]
    tokens, wall = 0, 0.0
    with torch.inference_mode():
        for request in requests:
            body = request["body"]
            if "messages" in body:
                ids = tokenizer.apply_chat_template(
                    body["messages"], add_generation_prompt=True, return_tensors="pt"
                )
            else:
                ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
            start = time.perf_counter()
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=body["max_tokens"],
                eos_token_id=None,  # as the server's ignore_eos
                do_sample=False,
            )
            wall += time.perf_counter() - start
            tokens += out.shape[1] - ids.shape[1]
    return {
        "requests": len(requests),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sequence-length", type=int, default=512)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-requests", type=int, default=8)
    parser.add_argument(
        "--buckets", type=int, nargs="+", help="prefill buckets (default: the export's)"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    folder = export(args)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mix = request_mix(args.requests, args.max_tokens, tokenizer, args.sequence_length)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(folder, port)
    rows = {}
    try:
        asyncio.run(run_clients(url, mix[:2], 1))  # warm-up: first requests, every endpoint
        for clients in args.concurrency:
            results, wall = asyncio.run(run_clients(url, mix, clients))
            rows[clients] = summarize(results, wall)
            print(f"{clients:>2} clients: {json.dumps(rows[clients])}", flush=True)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    hf = transformers_rate(args, mix)

    print(
        f"\n270M {args.dtype}, batch_size {args.batch_size}, buckets {buckets_of(folder)}, "
        f"{args.requests} requests of {args.max_tokens} tokens on average; transformers: "
        f"{hf['requests']} requests one at a time"
    )
    print("| clients | tokens/s | x 1 client | x transformers | TTFT p50 / p95 (s) ", end="")
    print("| ITL p50 / p95 (ms) |\n|---|---|---|---|---|---|")
    base = rows[min(rows)]["tokens_per_s"]
    for clients, row in rows.items():
        rate = row["tokens_per_s"]
        print(
            f"| {clients} | {rate:.1f} | {rate / base:.2f} | {rate / hf['tokens_per_s']:.2f} "
            f"| {row['ttft_p50_s']:.3f} / {row['ttft_p95_s']:.3f} "
            f"| {row['itl_p50_s'] * 1e3:.1f} / {row['itl_p95_s'] * 1e3:.1f} |"
        )
    print(f"| transformers, one at a time | {hf['tokens_per_s']:.1f} | | 1.00 | | |")
    checks = {}
    if 8 in rows and 1 in rows:
        at8 = rows[8]
        checks = {
            "speedup_vs_1_client": at8["tokens_per_s"] / rows[1]["tokens_per_s"],
            "speedup_vs_transformers": at8["tokens_per_s"] / hf["tokens_per_s"],
            "itl_p95_vs_step": at8["itl_p95_s"] / rows[1]["itl_p50_s"],
        }
        for name, value in checks.items():
            target = TARGETS[name]
            met = value <= target if name == "itl_p95_vs_step" else value >= target
            bound = "<=" if name == "itl_p95_vs_step" else ">="
            print(f"target {name}: {value:.2f} ({bound} {target}: {'met' if met else 'NOT met'})")
    if args.json:
        report = {
            "args": vars(args) | {"json": str(args.json)},
            "clients": rows,
            "transformers": hf,
        }
        args.json.write_text(json.dumps(report | {"targets": checks}, indent=2))


if __name__ == "__main__":
    main()
