"""Names this package shares with optimum-neuron, transformers and the CLI, defined once.

This module imports nothing, so every layer can use it, down to the lowest, and
`integration/cli.py` (whose parser optimum-cli builds at every start-up) stays light.
"""

TEXT_MODEL_TYPE = "gemma3_text"
MULTIMODAL_MODEL_TYPE = "gemma3"
# Both compile the text decoder; `IMAGE_TASK` also compiles a multimodal one's vision tower.
MODEL_TYPES = (TEXT_MODEL_TYPE, MULTIMODAL_MODEL_TYPE)
TASK = "text-generation"
# Multimodal checkpoints only: the text decoder plus the vision program.
IMAGE_TASK = "image-text-to-text"
# optimum-neuron's model registry keys are (model_type, task, mode).
REGISTRY_MODE = "inference"

# Which implementation compiles Gemma-3 for a Neuron instance when the installed
# optimum-neuron registers its own (see optimum_gemma3.integration.registry).
OPTIMUM_GEMMA3 = "optimum-gemma3"
OPTIMUM_NEURON = "optimum-neuron"
IMPLEMENTATIONS = (OPTIMUM_GEMMA3, OPTIMUM_NEURON)
IMPLEMENTATION_ENV = "OPTIMUM_GEMMA3_IMPLEMENTATION"

# Compile targets: this host's CPU (PyTorch AOTInductor) or an AWS Neuron instance family.
CPU_TARGETS = ("cpu",)
NEURON_TARGETS = ("inf2", "trn1", "trn2")
TARGETS = CPU_TARGETS + NEURON_TARGETS

# The weight-only formats of a self-draft for speculative decoding
# (`Gemma3NeuronConfig.draft_quantization_dtype`, see optimum_gemma3.graphs.draft).
DRAFT_DTYPES = ("int8",)
