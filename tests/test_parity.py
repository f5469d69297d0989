"""Our graphs against transformers 4.57 on random-weight models of every size's shape.

Every case runs a left-padded batch of mixed lengths whose prompts (up to 23 tokens) and
72-token generations go well past the 8- or 16-token sliding window.
"""

from __future__ import annotations

import pytest
import torch

from optimum_gemma3.accuracy import logit_tolerance_violations, logits_within_tolerance
from optimum_gemma3.generation import greedy_generate
from optimum_gemma3.modeling import Gemma3Decoder, text_config
from optimum_gemma3.weights import load_weights
from tests.tiny_models import TINY_CONFIGS, load_reference

LENGTHS = (5, 23, 14)
NEW_TOKENS = 72
SEQUENCE_LENGTH = 128


def left_padded_batch(vocab_size: int, lengths=LENGTHS, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, vocab_size, (length,), generator=generator)
        ids[row, width - length] = 2  # <bos>
        mask[row, width - length :] = 1
    return ids, mask


def build_decoder(folder, dtype=torch.float32, batch_size=3):
    from transformers import AutoConfig

    decoder = Gemma3Decoder(AutoConfig.from_pretrained(folder), batch_size, SEQUENCE_LENGTH, dtype)
    load_weights(decoder, folder)
    return decoder.eval()


def hf_greedy(model, ids, mask, new_tokens=NEW_TOKENS, eos_token_id=None, **kwargs):
    with torch.inference_mode():
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=0,
            **kwargs,
        )


def our_greedy(decoder, ids, mask, new_tokens=NEW_TOKENS, **kwargs):
    with torch.inference_mode():
        return greedy_generate(decoder.prefill, decoder.decode, ids, mask, new_tokens, **kwargs)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_fp32_greedy_tokens_identical(name, tiny_checkpoints):
    folder = tiny_checkpoints(name)
    reference = load_reference(folder, torch.float32, attn="eager")
    decoder = build_decoder(folder)
    ids, mask = left_padded_batch(text_config(reference.config).vocab_size)

    expected = hf_greedy(reference, ids, mask)
    ours = our_greedy(decoder, ids, mask)

    assert ours.sequences.shape == expected.shape
    mismatch = (ours.sequences != expected).nonzero().tolist()
    assert not mismatch, f"{name}: first mismatches (row, index) {mismatch[:5]}"
    # The generations are not degenerate: the window is exercised by varied tokens.
    assert len(set(expected[1, max(LENGTHS) :].tolist())) > 4


def test_fp32_matches_sdpa_reference_too(tiny_checkpoints):
    """transformers' default attention (sdpa) is the reference users see."""
    folder = tiny_checkpoints("270m")
    reference = load_reference(folder, torch.float32, attn="sdpa")
    ids, mask = left_padded_batch(512, seed=1)
    assert torch.equal(
        our_greedy(build_decoder(folder), ids, mask).sequences, hf_greedy(reference, ids, mask)
    )


@pytest.mark.parametrize("name", ["270m", "4b", "27b", "4b-multimodal-original"])
def test_bf16_logits_within_tolerance_of_hf_eager(name, tiny_checkpoints):
    folder = tiny_checkpoints(name)
    reference = load_reference(folder, torch.bfloat16, attn="eager")
    decoder = build_decoder(folder, torch.bfloat16)
    ids, mask = left_padded_batch(text_config(reference.config).vocab_size, seed=2)

    expected = hf_greedy(reference, ids, mask, output_logits=True, return_dict_in_generate=True)
    forced = expected.sequences[:, ids.shape[1] :]
    ours = our_greedy(decoder, ids, mask, forced_tokens=forced)
    expected_logits = torch.stack(expected.logits, dim=1)

    assert ours.logits.shape == expected_logits.shape
    worst = logit_tolerance_violations(ours.logits, expected_logits)
    assert logits_within_tolerance(ours.logits, expected_logits), worst


def test_eos_rows_finish_like_transformers(tiny_checkpoints):
    """Rows that hit EOS continue with padding; generation stops when all have finished."""
    folder = tiny_checkpoints("270m")
    reference = load_reference(folder)
    ids, mask = left_padded_batch(512)
    free_run = hf_greedy(reference, ids, mask)[:, ids.shape[1] :]
    eos = int(free_run[0, 10])  # a token row 0 produces mid-way
    expected = hf_greedy(reference, ids, mask, eos_token_id=[1, eos])
    ours = our_greedy(build_decoder(folder), ids, mask, eos_token_id=[1, eos])
    assert torch.equal(ours.sequences, expected)


def test_bucket_padding_and_right_padding_do_not_change_tokens(tiny_checkpoints):
    """Extra left padding up to a prefill bucket, or a right-padded input, is invisible."""
    folder = tiny_checkpoints("1b")
    decoder = build_decoder(folder)
    ids, mask = left_padded_batch(512, seed=3)
    baseline = our_greedy(decoder, ids, mask, new_tokens=40).sequences

    bucketed = our_greedy(decoder, ids, mask, new_tokens=40, prompt_length=64).sequences
    assert torch.equal(bucketed, baseline)

    lengths = mask.sum(-1)
    right_ids = torch.zeros_like(ids)
    right_mask = torch.zeros_like(mask)
    for row, length in enumerate(lengths.tolist()):
        right_ids[row, :length] = ids[row, ids.shape[1] - length :]
        right_mask[row, :length] = 1
    right = our_greedy(decoder, right_ids, right_mask, new_tokens=40).sequences
    assert torch.equal(right[:, ids.shape[1] :], baseline[:, ids.shape[1] :])


def test_prefill_logits_close_to_transformers_forward(tiny_checkpoints):
    """The prefill graph's last-token logits equal transformers' forward pass in fp32."""
    folder = tiny_checkpoints("27b")
    reference = load_reference(folder)
    decoder = build_decoder(folder)
    ids, mask = left_padded_batch(520, seed=4)
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        expected = reference(input_ids=ids, attention_mask=mask, position_ids=position_ids)
        ours = decoder.prefill(ids, mask)
    torch.testing.assert_close(ours, expected.logits[:, -1], rtol=1e-5, atol=1e-5)
