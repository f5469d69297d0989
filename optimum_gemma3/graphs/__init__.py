"""Static-shape Gemma-3 graphs (plain PyTorch): the part every compiler backend traces."""

from .config import FULL, SLIDING, text_config
from .decoder import DecodeGraph, Gemma3Decoder, PrefillGraph
from .ops import OpsProfile

__all__ = [
    "FULL",
    "SLIDING",
    "DecodeGraph",
    "Gemma3Decoder",
    "OpsProfile",
    "PrefillGraph",
    "text_config",
]
