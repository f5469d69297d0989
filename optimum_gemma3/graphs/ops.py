"""The ops profile: which forms of products, attention and gelu a decoder's graphs use.

Why a value passed in, not a setting: the forms differ in summation order and rounding,
so the profile is part of what a compiled program computes. A decoder takes it at
construction (`Gemma3Decoder(..., ops=profile)`) and its layers keep it, so two decoders
in one process can trace different graphs. The exporter chooses it (the `cpu` target:
this host's `for_host()`; Neuron: the plain default), records it in the export config,
keys the compile cache on it, and the runtime checks at load that the host can run it
(`missing_on_host`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import kernels


@dataclass(frozen=True)
class OpsProfile:
    """The plain default (every flag off) is `F.linear`, `F.gelu` and transformers'
    eager attention: what Neuron graphs and eager runs use."""

    skinny_linear: bool = False  # torch.ops.optimum_gemma3.skinny_linear (graphs/kernels)
    decode_attention: bool = False  # torch.ops.optimum_gemma3.decode_attention (same place)
    onednn: bool = False  # torch.ops.optimum_gemma3.dense: oneDNN, fp32, many rows
    # No bf16 matmul instructions: bf16 products of many rows (prefill projections,
    # attention) are computed from fp32 copies and rounded once (see `layers.linear`).
    bf16_products_in_fp32: bool = False
    # gelu(tanh) as x * sigmoid(2u), the same function (see `layers.gelu_tanh`).
    gelu_as_sigmoid: bool = False
    # Prefill takes the unpadded prompt, any length in one graph, and attends with torch's
    # scaled_dot_product_attention (see `layers.sdpa_prefill_attention`).
    sdpa_prefill: bool = False

    @classmethod
    def for_host(cls) -> OpsProfile:
        """The fastest forms this host has: its C++ kernels where they load, fp32 copies
        for bf16 products where the CPU has no bf16 matmul instructions."""
        has_kernels = kernels.load()
        return cls(
            skinny_linear=has_kernels,
            decode_attention=has_kernels,
            onednn=has_kernels and torch.backends.mkldnn.is_available(),
            bf16_products_in_fp32=not torch.backends.mkldnn.is_available()
            or not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
            gelu_as_sigmoid=True,
            sdpa_prefill=True,
        )

    @property
    def uses_kernels(self) -> bool:
        """Whether its graphs call this package's C++ CPU kernels."""
        return self.skinny_linear or self.decode_attention or self.onednn

    @property
    def kernels_isa(self) -> str | None:
        """The CPU features the kernels its graphs call need; None when they call none."""
        return kernels.REQUIRED_ISA if self.uses_kernels else None

    def to_dict(self) -> dict:
        """The flags, plus `kernels_isa` for whoever reads an export config."""
        return {**dataclasses.asdict(self), "kernels_isa": self.kernels_isa}

    @classmethod
    def from_dict(cls, recorded: dict) -> OpsProfile:
        """The inverse of `to_dict`, refusing fields this version does not know."""
        recorded = dict(recorded)
        recorded.pop("kernels_isa", None)  # derived from the flags
        unknown = sorted(set(recorded) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(
                f"ops_profile has fields this optimum-gemma3 does not know: {unknown}."
            )
        return cls(**recorded)

    def missing_on_host(self) -> str | None:
        """Why this host cannot run graphs traced with this profile (None: it can).

        Only the C++ kernels can be missing: the other forms are plain torch ops.
        """
        if not self.uses_kernels or kernels.load():
            return None
        return (
            f"its graphs call optimum-gemma3's C++ CPU kernels (which need {self.kernels_isa}), "
            f"and they cannot be loaded on this host: {kernels.unavailable_reason()}"
        )


PLAIN = OpsProfile()
