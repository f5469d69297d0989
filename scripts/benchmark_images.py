"""Image encoding and time to first token with one image, ours against transformers, same run.

    python scripts/benchmark_images.py [--dtype float32 bfloat16] [--vision-layers 2]
                                       [--text-layers 2] [--repeats 3] [--json OUT]

No multimodal Gemma-3 checkpoint is installable here, so the model is random-weight at the
width of Gemma-3 4b: its SigLIP tower (896-pixel images, 14-pixel patches, 1152 wide,
4304 MLP, 16 heads: 4096 patches) and projector to 256 image tokens, and its text decoder
(2560 wide, 10240 MLP, 8 query and 4 KV heads of 256, linear x8 RoPE on full layers,
the 262208-token vocabulary), with fewer layers (`--vision-layers`, `--text-layers`: every
layer of a kind costs the same, so time per layer scales to the real depths: 27 vision
and 34 text layers). For each dtype: export (timed), then alternately, `--repeats`
times, transformers (eager attention, as the exactness tests use; same threads) and ours,
and medians of
- vision encode: one image's features (`get_image_features` vs the vision program);
- TTFT: `generate(max_new_tokens=1)` of a ~290-token chat prompt holding one image (image
  encoding, prefill with the image block attending both ways, first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    SiglipVisionConfig,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimum_gemma3 import Gemma3NeuronModelForImageTextToText  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMAGE_SIZE = 896
TOKENS_PER_IMAGE = 256
# Gemma-3's ids: <image_soft_token>, <start_of_image>, <end_of_image>.
IMAGE_TOKEN, BOI, EOI = 262144, 255999, 256000
PROMPT_BUCKET = 512


def gemma3_4b_width(vision_layers: int, text_layers: int) -> Gemma3Config:
    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=IMAGE_SIZE,
        patch_size=14,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    text = dict(
        hidden_size=2560,
        intermediate_size=10240,
        num_hidden_layers=text_layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=1024,
        vocab_size=262208,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        layer_types=(["sliding_attention", "full_attention"] * text_layers)[:text_layers],
        max_position_embeddings=131072,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision.to_dict(),
        mm_tokens_per_image=TOKENS_PER_IMAGE,
        image_token_index=IMAGE_TOKEN,
        boi_token_index=BOI,
        eoi_token_index=EOI,
    )


def save_checkpoint(config: Gemma3Config, folder: Path) -> None:
    """Random weights (std 0.02 products, unit-scale norms) and the image processor."""
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(0.0, 1.0 if "norm" in name else 0.02)
    model.save_pretrained(folder)
    Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)


def one_image_prompt() -> dict[str, torch.Tensor]:
    """A chat-shaped prompt: 20 text tokens, the image block, 10 text tokens."""
    generator = torch.Generator().manual_seed(1)
    text = torch.randint(1000, 200000, (30,), generator=generator)
    image = torch.full((TOKENS_PER_IMAGE,), IMAGE_TOKEN)
    ids = torch.cat(
        [torch.tensor([2]), text[:20], torch.tensor([BOI]), image, torch.tensor([EOI]), text[20:]]
    )
    ids = ids[None]
    pixels = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "token_type_ids": (ids == IMAGE_TOKEN).long(),
        "pixel_values": pixels,
    }


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(dtype_name: str, checkpoint: Path, repeats: int) -> dict:
    dtype = DTYPES[dtype_name]
    start = time.perf_counter()
    ours = Gemma3NeuronModelForImageTextToText.from_pretrained(
        checkpoint,
        export=True,
        instance_type="cpu",
        torch_dtype=dtype_name,
        batch_size=1,
        sequence_length=PROMPT_BUCKET + 32,
        context_encoding_buckets=[PROMPT_BUCKET],
        max_num_images=1,
    )
    export_s = time.perf_counter() - start
    theirs = Gemma3ForConditionalGeneration.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="eager"
    ).eval()
    inputs = one_image_prompt()
    pixels = inputs["pixel_values"]
    greedy = dict(max_new_tokens=1, do_sample=False)
    runs = {"vision_hf": [], "vision_ours": [], "ttft_hf": [], "ttft_ours": []}
    with torch.inference_mode():
        theirs.generate(**inputs, **greedy)  # warm-up: first-call allocations
        for _ in range(repeats):
            runs["vision_hf"].append(
                seconds(lambda: theirs.model.get_image_features(pixels.to(dtype)))
            )
            runs["vision_ours"].append(seconds(lambda: ours.runtime.encode_images(pixels)))
            runs["ttft_hf"].append(seconds(lambda: theirs.generate(**inputs, **greedy)))
            runs["ttft_ours"].append(seconds(lambda: ours.generate(**inputs, **greedy)))
        same_token = torch.equal(
            theirs.generate(**inputs, **greedy), ours.generate(**inputs, **greedy)
        )
    result = {name: statistics.median(times) for name, times in runs.items()}
    result.update(dtype=dtype_name, export_s=export_s, prompt_tokens=inputs["input_ids"].shape[1])
    result["same_first_token"] = same_token
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"], choices=DTYPES)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--text-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = gemma3_4b_width(args.vision_layers, args.text_layers)
    results = []
    with tempfile.TemporaryDirectory(prefix="gemma3-4b-width-") as folder:
        save_checkpoint(config, Path(folder))
        for dtype_name in args.dtype:
            results.append(measure(dtype_name, Path(folder), args.repeats))
    print(
        f"\nGemma-3 4b width, {args.vision_layers} vision + {args.text_layers} text layers, "
        f"{args.threads} threads, medians of {args.repeats}"
    )
    print(
        "| dtype | vision encode HF / ours (s) | ratio | TTFT 1 image HF / ours (s) | ratio "
        "| same 1st token | export (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        vision = f"{r['vision_hf']:.2f} / {r['vision_ours']:.2f}"
        ttft = f"{r['ttft_hf']:.2f} / {r['ttft_ours']:.2f}"
        print(
            f"| {r['dtype']} | {vision} | {r['vision_ours'] / r['vision_hf']:.2f}x | {ttft} "
            f"| {r['ttft_ours'] / r['ttft_hf']:.2f}x | {r['same_first_token']} "
            f"| {r['export_s']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
