"""A request's logits do not depend on the other requests in its batch.

The same prompt alone and inside batches of 2..8 other prompts (other lengths, so other
left padding, at other places in the batch) gives bit-identical logits at every step,
prefill and decode, fp32 and bf16. What makes it so: each prompt is prefilled alone into
its own cache row in the bucket its own length picks, and the decode step's products sum
every row in one order whatever the number of rows (`graphs/kernels/row_products.h`).
Continuous batching (requests joining and leaving a batch) relies on it.
"""

from __future__ import annotations

import pytest
import torch

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from tests.test_kernels import needs_kernels

BATCH = 8
NEW_TOKENS = 6  # through the sliding window of 8, from prompts up to 30
# Two buckets, so that the other prompts run in their own bucket or in the target's.
SHAPE = dict(batch_size=BATCH, sequence_length=48, context_encoding_buckets=[16, 32])


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def model(request, tiny_checkpoints):
    """The 2-layer tiny model (one sliding, one full layer: the fewest programs to
    compile), compiled once per dtype for batch 8 and run at every user batch size."""
    source = tiny_checkpoints("2-layer")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        source, instance_type="cpu", torch_dtype=request.param, **SHAPE
    )
    return Gemma3NeuronModelForCausalLM.export(source, config)


def prompt(length: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (length,), generator=generator)
    ids[0] = 2  # <bos>
    return ids


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    return ids, mask


def step_logits(model, prompts: list[torch.Tensor], row: int) -> torch.Tensor:
    """`[steps, V]`: row `row`'s raw logits at every generated token."""
    ids, mask = left_padded(prompts)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return torch.stack([logits[row] for logits in out.logits])


@needs_kernels
def test_a_prompts_logits_are_the_same_in_any_batch(model):
    target = prompt(11, seed=0)
    alone = step_logits(model, [target], 0)
    for size in range(2, BATCH + 1):
        others = [prompt(3 + (5 * i + size) % 28, seed=size * 10 + i) for i in range(size - 1)]
        place = size % len(others) if size > 2 else 0
        batch = [*others[:place], target, *others[place:]]
        assert torch.equal(step_logits(model, batch, place), alone), (size, place)
    # Alone again, now that other requests have left their K/V in every cache row.
    assert torch.equal(step_logits(model, [target], 0), alone)
