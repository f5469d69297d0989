"""Gemma-3 text models for the Hugging Face optimum-neuron stack.

Importing this package registers `Gemma3NeuronModelForCausalLM` with optimum-neuron, so
`optimum.neuron.NeuronModelForCausalLM` handles `gemma3_text` and `gemma3` checkpoints.
"""

__version__ = "0.1.0.dev0"

from .exporters.neuron_config import Gemma3NeuronConfig  # noqa: E402
from .integration import register  # noqa: E402
from .modeling_neuron import Gemma3NeuronModelForCausalLM  # noqa: E402

register(Gemma3NeuronModelForCausalLM)

__all__ = ["Gemma3NeuronConfig", "Gemma3NeuronModelForCausalLM", "__version__"]
