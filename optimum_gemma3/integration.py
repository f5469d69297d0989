"""Registration with optimum-neuron, and the compatibility layer that makes it work without the SDK.

`register()` (run by `import optimum_gemma3`) registers `Gemma3NeuronModelForCausalLM`
in optimum-neuron's model registry for `("gemma3_text" | "gemma3", "text-generation",
"inference")`, which is how `NeuronModelForCausalLM.from_pretrained / get_neuron_config /
export` find a model class.

The compatibility layer: optimum-neuron 0.4.x's lookup (`get_neuron_model_class` ->
`has_neuron_model_class`) first imports `optimum.neuron.models.inference.auto_models`,
which imports every built-in NxD model and so the Neuron SDK; on a host without the SDK
that import fails before our registration is even consulted. On an SDK host the same
import runs after ours and could register a Gemma-3 class of its own under our keys.
So the lookup function bound in `optimum.neuron.models.inference.modeling_utils` is
wrapped: Gemma-3 keys resolve to our class directly, anything else goes to the original
lookup unchanged. The auto class's `get_neuron_config` and `from_pretrained` are routed
the same way: 0.4.x's `get_neuron_config` validates `instance_type` against Neuron
instances only and defaults the tensor-parallel degree to the host's NeuronCores (0 here)
before it reaches the model class, and its `from_pretrained` hands export options to
`AutoConfig`. Nothing pretends to be the SDK. `tests/test_integration.py` checks
every name this relies on, so an optimum-neuron release that moves them fails loudly.
"""

from __future__ import annotations

import functools
import inspect

from optimum.neuron.models import auto_model
from optimum.neuron.models.inference import modeling_utils
from transformers import AutoConfig

MODEL_TYPES = ("gemma3_text", "gemma3")
TASK = "text-generation"
MODE = "inference"

_OUR_CLASSES: dict[tuple[str, str, str], type] = {}


def register(model_class: type) -> None:
    """Register `model_class` for Gemma-3 text generation and install the lookup wrapper."""
    for model_type in MODEL_TYPES:
        key = (model_type, TASK, MODE)
        _OUR_CLASSES[key] = model_class
        auto_model.register_neuron_model(*key)(model_class)
    if not getattr(modeling_utils.get_neuron_model_class, "_optimum_gemma3", False):
        modeling_utils.get_neuron_model_class = _lookup_with_gemma3(
            modeling_utils.get_neuron_model_class
        )
    auto_class = modeling_utils.NeuronModelForCausalLM
    for name in ("get_neuron_config", "from_pretrained"):
        original = getattr(auto_class, name).__func__
        if not getattr(original, "_optimum_gemma3", False):
            setattr(auto_class, name, _route_gemma3(original, name))


def _lookup_with_gemma3(original):
    @functools.wraps(original)
    def get_neuron_model_class(model_type: str, task: str, mode: str):
        ours = _OUR_CLASSES.get((model_type, task, mode))
        return ours if ours is not None else original(model_type, task, mode)

    get_neuron_model_class._optimum_gemma3 = True
    return get_neuron_model_class


def _route_gemma3(original, name: str) -> classmethod:
    """Wrap an auto-class class method so Gemma-3 checkpoints go straight to our class.

    The model type is read with only `token` / `revision`: optimum-neuron's own
    `from_pretrained` passes every export option to `AutoConfig.from_pretrained`, which
    turns them into config attributes (and warns about `torch_dtype`).
    """

    @functools.wraps(original)
    def method(cls, model_id, *args, **kwargs):
        if inspect.isabstract(cls):
            config = kwargs.get("config") or AutoConfig.from_pretrained(
                model_id, token=kwargs.get("token"), revision=kwargs.get("revision")
            )
            ours = _OUR_CLASSES.get((config.model_type, TASK, MODE))
            if ours is not None:
                return getattr(ours, name)(model_id, *args, **kwargs)
        return original(cls, model_id, *args, **kwargs)

    method._optimum_gemma3 = True
    return classmethod(method)
