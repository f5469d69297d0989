"""Gemma-3 text models for the Hugging Face optimum-neuron stack."""

__version__ = "0.1.0.dev0"

from .exporters.neuron_config import Gemma3NeuronConfig  # noqa: E402
from .modeling_neuron import Gemma3NeuronModelForCausalLM  # noqa: E402

__all__ = ["Gemma3NeuronConfig", "Gemma3NeuronModelForCausalLM", "__version__"]
