"""Gemma-3 text models for the Hugging Face optimum-neuron stack."""

__version__ = "0.1.0.dev0"
