"""Gemma-3 text models for the Hugging Face optimum-neuron stack.

Importing this package registers `Gemma3NeuronModelForCausalLM` with optimum-neuron, so
`optimum.neuron.NeuronModelForCausalLM` handles `gemma3_text` and `gemma3` checkpoints, and
`Gemma3NeuronModelForImageTextToText` for multimodal `gemma3` checkpoints with images.
"""

from .quiet import neuron_device_probe_silenced

with neuron_device_probe_silenced():  # this import is what first imports optimum-neuron
    from .artifact.neuron_config import Gemma3NeuronConfig
    from .integration.image_text import Gemma3NeuronModelForImageTextToText
    from .integration.modeling import Gemma3NeuronModelForCausalLM
    from .integration.registry import register
from .version import __version__

register(Gemma3NeuronModelForCausalLM, Gemma3NeuronModelForImageTextToText)

__all__ = [
    "Gemma3NeuronConfig",
    "Gemma3NeuronModelForCausalLM",
    "Gemma3NeuronModelForImageTextToText",
    "__version__",
]
