"""What a step hands the token loop: next-token logits computed only as far as they are used."""

from __future__ import annotations

from collections.abc import Callable

import torch


class NextTokenLogits:
    """One step's next-token logits `[rows, V]`, computed only as far as they are used.

    `full()`: every exact logit. `near_top(k)`: the exact logit of every token that can be
    among its row's k largest, -inf elsewhere, and per row a `floor` that at least k of
    those logits reach and every other token's logit is below; a head that cannot screen
    returns the full logits and a floor of -inf. Each is computed on its first call and kept.
    """

    def __init__(
        self,
        full: Callable[[], torch.Tensor],
        near_top: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self._compute_full = full
        self._compute_near_top = near_top
        self._full: torch.Tensor | None = None
        self._near_top: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def of(cls, logits: torch.Tensor) -> NextTokenLogits:
        """Logits already computed in full."""
        return cls(lambda: logits)

    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = self._compute_full()
        return self._full

    def rows(self, index: torch.Tensor) -> NextTokenLogits:
        """The logits of rows `index`, computed with (and as) all of this step's: a view
        that computes nothing more."""
        return NextTokenLogits(
            lambda: self.full()[index], lambda k: tuple(part[index] for part in self.near_top(k))
        )

    def near_top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._compute_near_top is None:
            logits = self.full()
            return logits, torch.full((logits.shape[0],), -torch.inf)
        if k not in self._near_top:
            self._near_top[k] = self._compute_near_top(k)
        return self._near_top[k]
