"""How we compare our generations and logits with transformers'.

fp32 runs must produce identical greedy tokens. bf16 runs are compared teacher-forced
(both sides see the reference tokens, so one early tie does not fail a whole sequence)
with per-top-k logit tolerances, the ones neuronx-distributed-inference applies: on the
reference's top k logits of each step, `|ours - ref| <= atol + rtol * |ref|`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# top-k of the reference logits -> rtol; None means the whole vocabulary.
BF16_RTOL_BY_TOP_K: dict[int | None, float] = {5: 0.01, 50: 0.02, 1000: 0.03, None: 0.05}
ATOL = 1e-5


@dataclass
class TokenMatch:
    matched: int  # tokens equal to the reference, position by position
    total: int
    first_divergence: int | None  # index of the first differing new token, None if identical

    @property
    def percent(self) -> float:
        return 100.0 * self.matched / max(self.total, 1)


def token_match(ours: torch.Tensor, reference: torch.Tensor) -> TokenMatch:
    """Compare two 1-D sequences of new tokens (lengths may differ after an EOS)."""
    total = max(len(ours), len(reference))
    common = min(len(ours), len(reference))
    equal = (ours[:common] == reference[:common]).tolist() + [False] * (total - common)
    first = next((i for i, same in enumerate(equal) if not same), None)
    return TokenMatch(sum(equal), total, first)


def logit_tolerance_violations(ours: torch.Tensor, reference: torch.Tensor) -> dict:
    """For logits `[..., V]`, the worst `|ours - ref| / (atol + rtol * |ref|)` per top-k band.

    A value above 1 is a violation. Both tensors are compared in fp32.
    """
    ours, reference = ours.float(), reference.float()
    worst = {}
    for top_k, rtol in BF16_RTOL_BY_TOP_K.items():
        k = reference.shape[-1] if top_k is None else min(top_k, reference.shape[-1])
        index = reference.topk(k, dim=-1).indices
        ref_k, ours_k = reference.gather(-1, index), ours.gather(-1, index)
        ratio = (ours_k - ref_k).abs() / (ATOL + rtol * ref_k.abs())
        worst[top_k] = ratio.max().item()
    return worst


def logits_within_tolerance(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    return all(v <= 1.0 for v in logit_tolerance_violations(ours, reference).values())


def logit_error(logits: torch.Tensor, truth: torch.Tensor) -> dict[str, float]:
    """How far low-precision logits `[..., V]` are from fp32 logits of the same tokens.

    Means, not worst cases, so that the comparison is stable: `mean_abs` over the whole
    vocabulary, `top5` over the fp32 top-5 logits of each step (the ones sampling sees);
    `top1`: the fraction of steps whose argmax agrees.
    """
    logits, truth = logits.float(), truth.float()
    top5 = truth.topk(5, dim=-1).indices
    return {
        "mean_abs": (logits - truth).abs().mean().item(),
        "top5": (logits.gather(-1, top5) - truth.gather(-1, top5)).abs().mean().item(),
        "top1": (logits.argmax(-1) == truth.argmax(-1)).float().mean().item(),
    }


def less_accurate_than(
    ours: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, slack: float = 0.1
) -> list[str]:
    """Where bf16 `ours` is further from fp32 `truth` than bf16 `reference` is, by more than
    `slack` (relative for errors, absolute for argmax agreement); empty when it is not.

    The check for bf16 graphs whose products round differently from transformers' (our CPU
    kernels): transformers' bf16 logits are themselves several times the per-top-k
    tolerances away from fp32, so tolerances against them only hold for op-for-op copies.
    """
    mine, theirs = logit_error(ours, truth), logit_error(reference, truth)
    problems = [
        f"{name}: ours {mine[name]:.4g} vs reference {theirs[name]:.4g}"
        for name in ("mean_abs", "top5")
        if mine[name] > theirs[name] * (1 + slack)
    ]
    if mine["top1"] < theirs["top1"] - slack:
        problems.append(f"top1: ours {mine['top1']:.3f} vs reference {theirs['top1']:.3f}")
    return problems
