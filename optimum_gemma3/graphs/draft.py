"""The self-draft: the decoder with every layer's projections as weight-only int8 copies.

Speculative decoding checks drafted tokens with the verify program, so a draft only has to
guess well and cheaply. On a CPU a decode step costs the bytes of weights it reads; the
self-draft reads the layers' int8 copies (half of bf16's bytes, a quarter of fp32's) and,
on the host, the int8 copy of the head that the head's screen already holds (see
`runtime.self_draft`). It is the same model, so its guesses agree with the target's often;
its programs are the decode pass's per-layer programs traced with `QuantizedLinear`
projections, and its weights are made at load from the model's own
(`quantize_rows`), so an artifact stores nothing more than the programs.
"""

from __future__ import annotations

import torch

from .decoder import Gemma3Decoder
from .layers import Linear, QuantizedLinear


def quantize_projections(decoder: Gemma3Decoder) -> Gemma3Decoder:
    """`decoder` (a skeleton), its layers' `Linear` projections replaced in place by
    `QuantizedLinear` ones of the same shape: the self-draft's graphs."""
    for layer in decoder.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is not Linear:
                    continue
                setattr(parent, name, QuantizedLinear(child))
    return decoder


def draft_weights(
    weights: dict[str, torch.Tensor], draft: Gemma3Decoder
) -> dict[str, torch.Tensor]:
    """The self-draft decoder's tensors by name, from the model's `weights`: each projection's
    int8 copy and row scales (`quantize_rows` of its weight), every other tensor shared."""
    tensors = {}
    for name, _ in draft.named_parameters():
        module, _, field = name.rpartition(".")
        if field == "q8":
            q8, scales = torch.ops.optimum_gemma3.quantize_rows(weights[f"{module}.weight"])
            tensors[name], tensors[f"{module}.scales"] = q8, scales
        elif field != "scales":
            tensors[name] = weights[name]
    return tensors
