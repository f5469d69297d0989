"""The vocabulary head, run by the runtime after a program that ends at the final norm.

Why on the host: greedy decoding needs only each row's largest logit, and top-k sampling
its k largest, yet computing all 262144 reads the whole head, most of a small model's
weights (671 MB of the 270M's 1.07 GB in fp32). `screened_linear` finds the few tokens
that can be among them from an int8 copy of the head and computes just those exactly, so
such a step reads a quarter of the head in fp32 (half in bf16) and picks the same token.
Sampling without top-k, `output_logits` and processors that change values before top-k
still get every logit, from the same product the program would run.
Used by `cpu` artifacts with one rank (`Gemma3NeuronConfig.head_on_host`).
"""

from __future__ import annotations

import logging

import torch

from ..graphs.layers import SKINNY_MAX_ROWS, linear
from ..graphs.ops import OpsProfile
from .logits import NextTokenLogits

logger = logging.getLogger(__name__)


class HostHead:
    """`hidden @ weight.T` on demand: in full, or only where it can be among a row's k
    largest.

    Holds an int8 copy of the weight with one scale per row (`quantize_rows`), made at
    load: a quarter of the fp32 head's memory (168 MB for Gemma-3's vocabulary at 640
    features). `ops` is the artifact's recorded profile; without its CPU kernels there is
    no screening, only the full product. With them, a row's logits do not depend on the
    other rows it is computed with (batch invariance), at any number of rows.
    """

    def __init__(self, weight: torch.Tensor, ops: OpsProfile):
        self.weight = weight
        self.ops = ops
        self.screen = None
        if ops.skinny_linear:
            self.screen = torch.ops.optimum_gemma3.quantize_rows(weight)
            logger.info(
                "Screening head: int8 copy of %s, %d MB", tuple(weight.shape), weight.numel() >> 20
            )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Every logit. With the kernels, by `skinny_linear` whatever the number of rows: it
        sums each row in one order, so a row's logits are the same bits alone or in a batch
        of any size (the product `linear` picks past `SKINNY_MAX_ROWS` rows sums in
        another order). Without them, by the product the profile picks."""
        if self.ops.skinny_linear:
            return torch.ops.optimum_gemma3.skinny_linear(hidden, self.weight)
        return linear(hidden, self.weight, self.ops)

    def screened(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`NextTokenLogits.near_top(k)` by `screened_linear` (needs the kernels), in blocks
        of at most `SKINNY_MAX_ROWS` rows (its limit); its exact logits reproduce
        `skinny_linear`'s sums. A k beyond the vocabulary asks for every token, as top-k
        does. Where the screen's bound cannot hold (a sum could overflow), every logit and a
        floor of -inf, as a head that cannot screen answers."""
        k = min(k, self.weight.shape[0])
        blocks = [
            torch.ops.optimum_gemma3.screened_linear(block, self.weight, *self.screen, k=k)
            for block in hidden.split(SKINNY_MAX_ROWS)
        ]
        logits, floors = zip(*blocks, strict=True)
        return torch.cat(logits), torch.cat(floors)

    def next_token_logits(self, hidden: torch.Tensor) -> NextTokenLogits:
        """The logits of `hidden`, screened for `near_top` where the kernels are loaded
        (else `NextTokenLogits` answers `near_top` with every logit)."""
        return NextTokenLogits(
            lambda: self.logits(hidden),
            (lambda k: self.screened(hidden, k)) if self.screen is not None else None,
        )
