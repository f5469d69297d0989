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
    features). `ops` is the artifact's recorded profile, so the full product is the one
    its programs would have computed; without its CPU kernels there is no screening, only
    the full product.
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
        """Every logit, by the product the program itself would have used."""
        return linear(hidden, self.weight, self.ops)

    def screened(self, hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`NextTokenLogits.near_top(k)` by `screened_linear` (needs the kernels, and at most
        `SKINNY_MAX_ROWS` rows: the full product is then `skinny_linear`, whose sums the
        screen reproduces). A k beyond the vocabulary asks for every token, as top-k does.
        Where the screen's bound cannot hold (a sum could overflow), every logit and a floor
        of -inf, as a head that cannot screen answers."""
        k = min(k, self.weight.shape[0])
        return torch.ops.optimum_gemma3.screened_linear(hidden, self.weight, *self.screen, k=k)

    def next_token_logits(self, hidden: torch.Tensor) -> NextTokenLogits:
        """The logits of `hidden`, screened for `near_top` where `screened` applies (else
        `NextTokenLogits` answers `near_top` with every logit)."""
        can_screen = self.screen is not None and hidden.shape[0] <= SKINNY_MAX_ROWS
        return NextTokenLogits(
            lambda: self.logits(hidden),
            (lambda k: self.screened(hidden, k)) if can_screen else None,
        )
