"""Registration with optimum-neuron, and the compatibility layer that makes it work without the SDK.

`register()` (run by `import optimum_gemma3`) registers `Gemma3NeuronModelForCausalLM`
in optimum-neuron's model registry for `("gemma3_text" | "gemma3", "text-generation",
"inference")`, which is how `NeuronModelForCausalLM.from_pretrained / get_neuron_config /
export` find a model class, and `Gemma3NeuronModelForImageTextToText` for `("gemma3",
"image-text-to-text", "inference")` (optimum-neuron 0.4.x has no auto class for that task
to route; `get_neuron_model_class` finds it). An entry optimum-neuron already holds there
(its own Gemma-3) is kept: see "Which implementation" below.

The compatibility layer: optimum-neuron 0.4.x's lookup (`get_neuron_model_class` ->
`has_neuron_model_class`) first imports `optimum.neuron.models.inference.auto_models`,
which imports every built-in NxD model and so the Neuron SDK; on a host without the SDK
that import fails before our registration is even consulted. So the lookup function bound
in `optimum.neuron.models.inference.modeling_utils` is wrapped: Gemma-3 keys resolve to
our class directly; any other model goes to the original lookup unchanged where the SDK is
installed, and is refused with what it needs where it is not (instead of
`No module named 'neuronx_distributed'`). The auto class's `get_neuron_config` and
`from_pretrained` are routed the same way: 0.4.x's `get_neuron_config` validates
`instance_type` against Neuron instances only and defaults the tensor-parallel degree to
the host's NeuronCores (0 here) before it reaches the model class, and its
`from_pretrained` hands export options to `AutoConfig`. Nothing pretends to be the SDK.
`tests/test_integration.py` checks every name this relies on, so an optimum-neuron
release that moves them fails loudly.

Which implementation compiles Gemma-3: optimum-neuron's newer releases ship their own
Gemma-3, registered by `auto_models` on SDK hosts, with known numeric gaps (no
`query_pre_attn_scalar`, no bidirectional attention among image tokens). For a Neuron
target where both exist, optimum-gemma3 compiles by default and says so in one log line
naming the switch: the export option `implementation="optimum-neuron"` (CLI
`--implementation`) or the environment variable `OPTIMUM_GEMMA3_IMPLEMENTATION`. The `cpu`
target exists only here. Loading a compiled folder goes to the implementation that wrote it.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from pathlib import Path

from huggingface_hub import hf_hub_download
from optimum.neuron.models import auto_model
from optimum.neuron.models.inference import modeling_utils
from optimum.neuron.version import __version__ as optimum_neuron_version
from transformers import AutoConfig

from ..artifact.files import NEURON_CONFIG_NAME
from ..compiler import CPU_TARGETS
from ..compiler.neuron import missing_sdk_packages
from ..constants import (
    IMAGE_TASK,
    IMPLEMENTATION_ENV,
    IMPLEMENTATIONS,
    MODEL_TYPES,
    MULTIMODAL_MODEL_TYPE,
    OPTIMUM_GEMMA3,
    OPTIMUM_NEURON,
    REGISTRY_MODE,
    TASK,
)
from .modeling import target_for_instance_type

logger = logging.getLogger(__name__)

# The key `neuron_config.json` holds only when optimum-gemma3 wrote the folder.
OUR_ARTIFACT_KEY = "optimum_gemma3_version"

_OUR_CLASSES: dict[tuple[str, str, str], type] = {}


class UnsupportedModelError(ValueError):
    """A model this host cannot compile or load: not Gemma-3, and no Neuron SDK for the rest.

    A ValueError like optimum-neuron's own "Model type ... is not supported".
    """


def register(model_class: type, image_class: type) -> None:
    """Register `model_class` for Gemma-3 text generation and `image_class` for multimodal
    Gemma-3's image-text-to-text, and install the lookup wrappers."""
    keys = [((model_type, TASK, REGISTRY_MODE), model_class) for model_type in MODEL_TYPES]
    keys.append(((MULTIMODAL_MODEL_TYPE, IMAGE_TASK, REGISTRY_MODE), image_class))
    for key, registered in keys:
        _OUR_CLASSES[key] = registered
        if key not in auto_model._REGISTERED_NEURON_MODELS:  # keep optimum-neuron's own
            auto_model.register_neuron_model(*key)(registered)
    if not getattr(modeling_utils.get_neuron_model_class, "_optimum_gemma3", False):
        modeling_utils.get_neuron_model_class = _lookup_with_gemma3(
            modeling_utils.get_neuron_model_class
        )
    auto_class = modeling_utils.NeuronModelForCausalLM
    for name in ("get_neuron_config", "from_pretrained"):
        original = getattr(auto_class, name).__func__
        if not getattr(original, "_optimum_gemma3", False):
            setattr(auto_class, name, _route_gemma3(original, name))


def refuse_without_sdk(model_type: str, task: str = TASK, source: str = "This model") -> None:
    """Raise `UnsupportedModelError` for a model only optimum-neuron handles, on a host
    without the Neuron SDK (where optimum-neuron's lookup would die importing it)."""
    missing = missing_sdk_packages()
    if missing:
        raise UnsupportedModelError(
            f"{source} is a {model_type!r} model for {task!r}: optimum-gemma3 compiles only "
            f"Gemma-3 ({' and '.join(MODEL_TYPES)}) for {TASK!r}. Other models need "
            "optimum-neuron's own implementation, which needs the AWS Neuron SDK (missing "
            f"here: {', '.join(missing)}): install the Neuron SDK on an Inferentia/Trainium "
            "host (`pip install optimum-neuron[neuronx] --extra-index-url "
            "https://pip.repos.neuron.amazonaws.com`)."
        )


def optimum_neuron_class(model_type: str) -> type | None:
    """optimum-neuron's own class for this Gemma-3 model type, or None where it has none.

    optimum-neuron registers its built-in models when `auto_models` is imported, which
    imports the Neuron SDK, so that import is attempted only on hosts with the SDK.
    """
    if not missing_sdk_packages():
        from optimum.neuron.models.inference import auto_models  # noqa: F401  (registers)
    key = (model_type, TASK, REGISTRY_MODE)
    registered = auto_model._REGISTERED_NEURON_MODELS.get(key)
    return None if registered is None or registered is _OUR_CLASSES[key] else registered


def choose_implementation(
    model_type: str, instance_type: str | None, implementation: str | None = None
) -> str:
    """`OPTIMUM_GEMMA3` or `OPTIMUM_NEURON`: which one compiles this Gemma-3 export.

    `implementation` (the export option) wins over the environment variable. Where
    optimum-neuron has its own Gemma-3 and the target is a Neuron instance, one line says
    which compiles the model and how to pick the other: a warning when nobody chose (a
    silent default would hide that optimum-neuron's class is not the one used), an info
    line when the caller did.
    """
    choice, source = _requested_implementation(implementation)
    theirs = optimum_neuron_class(model_type)
    if theirs is None and choice != OPTIMUM_NEURON:
        return OPTIMUM_GEMMA3
    target = target_for_instance_type(instance_type)
    if target in CPU_TARGETS:
        if choice == OPTIMUM_NEURON:
            raise ValueError(
                f"{source} selects optimum-neuron's Gemma-3, which compiles for Neuron "
                f"instances only; instance_type={target!r} is compiled by {OPTIMUM_GEMMA3}. "
                f"Choose a Neuron instance_type or implementation={OPTIMUM_GEMMA3!r}."
            )
        return OPTIMUM_GEMMA3
    if theirs is None:
        raise ValueError(
            f"{source} selects optimum-neuron's Gemma-3, but the installed optimum-neuron "
            f"{optimum_neuron_version} registers no {model_type!r} model here (its models "
            "need the AWS Neuron SDK and a release that ships Gemma-3). Use "
            f"implementation={OPTIMUM_GEMMA3!r} or upgrade optimum-neuron."
        )
    chosen = choice or OPTIMUM_GEMMA3
    other = OPTIMUM_NEURON if chosen == OPTIMUM_GEMMA3 else OPTIMUM_GEMMA3
    logger.log(
        logging.INFO if choice else logging.WARNING,
        "%s compiles this %s model for %s (%s); optimum-neuron %s also has a Gemma-3: to use "
        "%s's, pass implementation=%r (CLI: --implementation %s) or set %s=%s.",
        chosen,
        model_type,
        target,
        source if choice else "the default",
        optimum_neuron_version,
        other,
        other,
        other,
        IMPLEMENTATION_ENV,
        other,
    )
    return chosen


def _requested_implementation(implementation: str | None) -> tuple[str | None, str]:
    """The implementation asked for (option, else environment variable) and who asked."""
    source = f"implementation={implementation!r}"
    if implementation is None:
        implementation = os.environ.get(IMPLEMENTATION_ENV) or None
        source = f"{IMPLEMENTATION_ENV}={implementation}"
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown {source}: expected one of {', '.join(map(repr, IMPLEMENTATIONS))}."
        )
    return implementation, source


def _lookup_with_gemma3(original):
    @functools.wraps(original)
    def get_neuron_model_class(model_type: str, task: str, mode: str):
        ours = _OUR_CLASSES.get((model_type, task, mode))
        if ours is not None:
            return ours
        refuse_without_sdk(model_type, task)
        return original(model_type, task, mode)

    get_neuron_model_class._optimum_gemma3 = True
    return get_neuron_model_class


def _route_gemma3(original, name: str) -> classmethod:
    """Wrap an auto-class class method so Gemma-3 checkpoints go to the chosen class.

    The model type is read with only `token` / `revision`: optimum-neuron's own
    `from_pretrained` passes every export option to `AutoConfig.from_pretrained`, which
    turns them into config attributes (and warns about `torch_dtype`).
    """

    @functools.wraps(original)
    def method(cls, model_id, *args, **kwargs):
        if not inspect.isabstract(cls):
            return original(cls, model_id, *args, **kwargs)
        token, revision = kwargs.get("token"), kwargs.get("revision")
        config = kwargs.get("config") or AutoConfig.from_pretrained(
            model_id, token=token, revision=revision
        )
        ours = _OUR_CLASSES.get((config.model_type, cls.task, REGISTRY_MODE))
        if ours is None:
            refuse_without_sdk(config.model_type, cls.task, source=str(model_id))
            return original(cls, model_id, *args, **kwargs)
        if name == "from_pretrained" and not kwargs.get("export"):
            chosen = _class_of_compiled(model_id, config.model_type, token, revision)
        else:
            implementation = choose_implementation(
                config.model_type, kwargs.get("instance_type"), kwargs.pop("implementation", None)
            )
            if implementation == OPTIMUM_NEURON:
                chosen = optimum_neuron_class(config.model_type)
            else:
                chosen = ours
        return getattr(chosen, name)(model_id, *args, **kwargs)

    method._optimum_gemma3 = True
    return classmethod(method)


def _class_of_compiled(model_id, model_type: str, token, revision) -> type:
    """The class that loads a compiled Gemma-3 folder or Hub repo: the one that wrote it."""
    ours = _OUR_CLASSES[(model_type, TASK, REGISTRY_MODE)]
    theirs = optimum_neuron_class(model_type)
    if theirs is None:
        return ours
    if Path(model_id).is_dir():
        config_file = Path(model_id) / NEURON_CONFIG_NAME
    else:
        config_file = Path(
            hf_hub_download(str(model_id), NEURON_CONFIG_NAME, revision=revision, token=token)
        )
    written_by_us = config_file.is_file() and OUR_ARTIFACT_KEY in json.loads(
        config_file.read_text()
    )
    return ours if written_by_us else theirs
