"""Static-shape Gemma-3 graphs (plain PyTorch): the part every compiler backend traces.

The ops profile they are traced with is `graphs.ops.OpsProfile`."""

from .config import FULL, SLIDING, text_config
from .decoder import DecodeGraph, Gemma3Decoder, PrefillGraph

__all__ = [
    "FULL",
    "SLIDING",
    "DecodeGraph",
    "Gemma3Decoder",
    "PrefillGraph",
    "text_config",
]
