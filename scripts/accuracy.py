"""Token-match table: our Gemma-3 graphs against transformers 4.57 on the same prompts.

    python scripts/accuracy.py --model DIR [--dtype float32|bfloat16] [--prompts FILE.jsonl]
                               [--max-new-tokens N] [--batch-size B] [--plain-graphs]

Prompts are JSON lines with a "prompt" string or chat "messages" (Gemma-3 chat template),
and an optional "name". Both sides generate greedily from the same left-padded batches.

- float32: the reference is transformers' default (sdpa). A prompt passes when every
  new token is identical; the max |logit difference| is taken up to the first
  divergence.
- bfloat16: the reference is transformers' bf16 eager attention. The token match of the
  free-running generations is reported, and a prompt passes when the teacher-forced
  logits are within the per-top-k tolerances of `optimum_gemma3.accuracy`.
Our side computes what the `cpu` backend's programs compute on this host (its CPU
kernels: `skinny_linear`, `decode_attention`, oneDNN); `--plain-graphs` runs the graphs
as traced for Neuron (`F.linear`, masked attention) instead. The bf16 tolerances are a
criterion for plain graphs: the kernels round bf16 products once from fp32 sums, which
the tests check for accuracy against fp32 instead (README, "Exactness").
Exit status 0 only when every prompt passes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from optimum_gemma3.accuracy import logits_within_tolerance, token_match
from optimum_gemma3.graphs import Gemma3Decoder
from optimum_gemma3.graphs.ops import OpsProfile
from optimum_gemma3.runtime.loop import greedy_generate
from optimum_gemma3.weights import load_weights

logger = logging.getLogger("accuracy")
DEFAULT_PROMPTS = Path(__file__).parent / "prompts" / "accuracy.jsonl"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def read_prompts(path: Path, tokenizer) -> list[tuple[str, list[int]]]:
    """(name, token ids) per JSON line; chat prompts go through the model's chat template."""
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" in item:
            # The template emits <bos> itself: no second one from the tokenizer.
            text = tokenizer.apply_chat_template(
                item["messages"], tokenize=False, add_generation_prompt=True
            )
            ids = tokenizer(text, add_special_tokens=False).input_ids
        elif "prompt" in item:
            ids = tokenizer(item["prompt"]).input_ids
        else:
            raise ValueError(f"{path}:{number}: expected a 'prompt' or 'messages' field.")
        prompts.append((item.get("name", f"prompt-{number}"), ids))
    return prompts


def left_padded(batch: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def compare_batch(reference, decoder, input_ids, mask, args, generation_config):
    """(match, max |logit diff|, passed) for each row of one batch."""
    gen_kwargs = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=False,
        eos_token_id=generation_config.eos_token_id,
        pad_token_id=generation_config.pad_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    with torch.inference_mode():
        expected = reference.generate(input_ids=input_ids, attention_mask=mask, **gen_kwargs)
        ours = greedy_generate(
            decoder.prefill,
            decoder.decode,
            input_ids,
            mask,
            args.max_new_tokens,
            eos_token_id=generation_config.eos_token_id,
            pad_token_id=generation_config.pad_token_id,
        )
        expected_tokens = expected.sequences[:, input_ids.shape[1] :]
        expected_logits = torch.stack(expected.logits, dim=1).float()
        forced = None
        if args.dtype == "bfloat16":
            forced = greedy_generate(
                decoder.prefill,
                decoder.decode,
                input_ids,
                mask,
                expected_tokens.shape[1],
                pad_token_id=generation_config.pad_token_id,
                forced_tokens=expected_tokens,
            )
    ours_tokens = ours.sequences[:, input_ids.shape[1] :]
    rows = []
    for row in range(input_ids.shape[0]):
        match = token_match(ours_tokens[row], expected_tokens[row])
        if forced is not None:
            ours_logits, ref_logits = forced.logits[row], expected_logits[row]
            passed = logits_within_tolerance(ours_logits, ref_logits)
        else:
            steps = match.total if match.first_divergence is None else match.first_divergence + 1
            steps = min(steps, ours.logits.shape[1], expected_logits.shape[1])
            ours_logits, ref_logits = ours.logits[row, :steps], expected_logits[row, :steps]
            passed = match.first_divergence is None
        rows.append((match, (ours_logits - ref_logits).abs().max().item(), passed))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF checkpoint folder (safetensors)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--plain-graphs", action="store_true", help="F.linear and masked attention (Neuron's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(os.cpu_count() or 1)

    dtype = DTYPES[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    generation_config = GenerationConfig.from_pretrained(args.model)
    prompts = read_prompts(args.prompts, tokenizer)
    attn = "sdpa" if dtype == torch.float32 else "eager"
    reference = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=dtype, attn_implementation=attn
    ).eval()
    longest = max(len(ids) for _, ids in prompts)
    ops = OpsProfile() if args.plain_graphs else OpsProfile.for_host()
    decoder = Gemma3Decoder(
        AutoConfig.from_pretrained(args.model),
        args.batch_size,
        longest + args.max_new_tokens,
        dtype,
        ops=ops,
    )
    load_weights(decoder, args.model)
    decoder.eval()
    logger.info("reference: transformers %s %s attention", args.dtype, attn)
    logger.info("ours: %s", ops)

    header = (
        f"{'prompt':<14} {'tokens':>6} {'new':>4} {'match %':>8} {'first diff':>10} "
        f"{'max |dlogit|':>12}  ok"
    )
    print(header)
    print("-" * len(header))
    identical = matched = total = 0
    all_passed = True
    start = time.perf_counter()
    for first in range(0, len(prompts), args.batch_size):
        chunk = prompts[first : first + args.batch_size]
        batch = [ids for _, ids in chunk]
        # A partial last batch is padded with copies so the static batch size holds.
        batch += [batch[-1]] * (args.batch_size - len(batch))
        input_ids, mask = left_padded(batch, generation_config.pad_token_id)
        rows = compare_batch(reference, decoder, input_ids, mask, args, generation_config)
        for (name, ids), (match, max_diff, passed) in zip(chunk, rows, strict=False):
            first_diff = "-" if match.first_divergence is None else str(match.first_divergence)
            print(
                f"{name[:14]:<14} {len(ids):>6} {match.total:>4} {match.percent:>7.1f}% "
                f"{first_diff:>10} {max_diff:>12.3g}  {'yes' if passed else 'NO'}"
            )
            identical += match.first_divergence is None
            matched += match.matched
            total += match.total
            all_passed &= passed
    logger.info("took %.1f s", time.perf_counter() - start)
    print(
        f"summary: {identical}/{len(prompts)} prompts identical, "
        f"token match {100.0 * matched / max(total, 1):.1f}%"
    )
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
