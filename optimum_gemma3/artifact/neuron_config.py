"""The export config (`neuron_config.json`): shapes, buckets, dtype, target and provenance.

It extends optimum-neuron's `NxDNeuronConfig`, so field names (`batch_size`,
`sequence_length`, `max_context_length`, `tp_degree`, `torch_dtype`, `target`,
`on_device_sampling`, `checkpoint_id`, `checkpoint_revision`) mean what they mean there,
and optimum-neuron's serialization and version checks apply. Added here: the prefill
buckets (`context_encoding_buckets`, NxD-inference's name); the versions of this
library, torch and the compiler that built the artifact; the ops profile its graphs were
traced with (`ops_profile`: which products, attention and gelu forms, and the CPU
features the kernels they call need); the CPU instruction set the compiled programs need
(`program_isa`, None for Neuron programs); for `image-text-to-text` exports, the most
images one prompt may hold (`max_num_images`; None: a text-only artifact); the weight
format of the self-draft for speculative decoding (`draft_quantization_dtype`, named after
optimum-neuron's `quantization_dtype`; None: no self-draft).
"""

from __future__ import annotations

import torch
from optimum.neuron.configuration_utils import register_neuron_config
from optimum.neuron.models.inference.backend.config import NxDNeuronConfig
from optimum.neuron.utils.version_utils import get_neuronxcc_version
from optimum.neuron.version import __version__ as optimum_neuron_version

from ..constants import DRAFT_DTYPES, NEURON_TARGETS, TARGETS
from ..graphs.ops import OpsProfile
from ..graphs.parallel import TensorParallelLayout
from ..version import __version__

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float": "float32"}
SMALLEST_BUCKET = 128
# neuronx-cc has crashed on head_dim 256 prefill graphs shorter than 512 tokens.
SMALLEST_NEURON_BUCKET_HEAD_DIM_256 = 512


def dtype_name(dtype: str | torch.dtype) -> str:
    """Normalize a torch dtype or its name (`bf16`, `bfloat16`, `torch.bfloat16`) to a name."""
    name = str(dtype).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in SUPPORTED_DTYPES:
        hint = (
            " Gemma-3 activations overflow float16; use bfloat16."
            if name in ("float16", "fp16", "half")
            else ""
        )
        raise ValueError(
            f"Unsupported torch_dtype {name!r}: expected one of "
            f"{', '.join(SUPPORTED_DTYPES)}.{hint}"
        )
    return name


def default_buckets(max_context_length: int, smallest: int = SMALLEST_BUCKET) -> list[int]:
    """Powers of two from `smallest` up to (and ending with) `max_context_length`.

    A prompt runs in the smallest bucket that holds it, so prefill work stays within 2x
    of the prompt length while the number of compiled programs grows only logarithmically.
    """
    buckets, size = [], min(smallest, max_context_length)
    while size < max_context_length:
        buckets.append(size)
        size *= 2
    return buckets + [max_context_length]


@register_neuron_config
class Gemma3NeuronConfig(NxDNeuronConfig):
    """Export config of a compiled Gemma-3 text decoder."""

    def __init__(
        self,
        context_encoding_buckets: list[int] | None = None,
        optimum_gemma3_version: str | None = None,
        torch_version: str | None = None,
        compiler: str | None = None,
        compiler_version: str | None = None,
        artifact_files: dict[str, str | None] | None = None,
        head_on_host: bool | None = None,
        layer_programs: bool | None = None,
        ops_profile: OpsProfile | dict | None = None,
        program_isa: str | None = None,
        max_num_images: int | None = None,
        draft_quantization_dtype: str | None = None,
        **kwargs,
    ):
        # Normalized here, before the base class maps names with its own table: aliases
        # (`bf16`, `fp32`) and the float16 refusal live in `dtype_name` only.
        kwargs["torch_dtype"] = SUPPORTED_DTYPES[dtype_name(kwargs.get("torch_dtype") or "float32")]
        kwargs.setdefault("target", "cpu")
        super().__init__(**kwargs)
        self.context_encoding_buckets = context_encoding_buckets
        self.optimum_gemma3_version = optimum_gemma3_version or __version__
        self.torch_version = torch_version or torch.__version__
        self.compiler = compiler
        self.compiler_version = compiler_version
        # Every file the runtime needs, by path in the folder: the sha256 of each program,
        # None for the weights (too large to hash on every load; safetensors checks them).
        self.artifact_files = artifact_files or {}
        # Whether the programs end at the final norm and the runtime runs the vocabulary
        # head, computing only the logits a step needs (`optimum_gemma3.runtime.head`): the `cpu`
        # target with one rank. Elsewhere the head stays in the program, on the device.
        if head_on_host is None:
            head_on_host = self.target == "cpu" and self.tp_degree == 1
        self.head_on_host = head_on_host
        # Whether each pass is compiled as one program per layer type (and one for the last
        # layer with the final norm) that the runtime calls layer by layer, instead of one
        # program of the whole stack: far quicker to compile. Needs the head on the host
        # and one prefill program for every length, as the `cpu` target with one rank has.
        if layer_programs is None:
            layer_programs = self.head_on_host
        self.layer_programs = layer_programs
        # Set by the exporter (None until then): the forms the programs compute with, so
        # that the runtime can check the host runs them and compute the head alike.
        if isinstance(ops_profile, dict):
            ops_profile = OpsProfile.from_dict(ops_profile)
        self.ops_profile = ops_profile
        self.program_isa = program_isa
        # Set for `image-text-to-text` exports, which add the vision program and give the
        # prefill programs image inputs; None: text only.
        self.max_num_images = max_num_images
        # Set to compile the self-draft's programs (`graphs.draft`): a weight-only copy of
        # the model in this format, made at load, drafting tokens the verify program checks.
        self.draft_quantization_dtype = draft_quantization_dtype

    @property
    def has_images(self) -> bool:
        """Whether the artifact takes images (an `image-text-to-text` export)."""
        return self.max_num_images is not None

    @property
    def prefill_any_length(self) -> bool:
        """Whether one prefill program serves every prompt length up to the largest bucket
        (each padded to a whole number of `SDPA_QUERY_BLOCK` tokens) instead of
        one program per bucket: the graphs of an `sdpa_prefill` ops profile (the `cpu`
        target's), see `graphs.layers.sdpa_prefill_attention`."""
        return self.ops_profile is not None and self.ops_profile.sdpa_prefill

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.torch_dtype)

    def to_dict(self) -> dict:
        """Serialize like optimum-neuron's `NeuronConfig.to_dict`, also on hosts without the SDK
        (where the base class fails to read the neuronx-cc version)."""
        output = {name: _plain(value) for name, value in vars(self).items()}
        output["_serialized_key"] = type(self).__name__
        output["optimum_neuron_version"] = optimum_neuron_version
        output["neuronxcc_version"] = _neuronxcc_version()
        return output

    @classmethod
    def from_dict(cls, config_dict: dict) -> Gemma3NeuronConfig:
        """Deserialize, refusing a file from another optimum-neuron or neuronx-cc version."""
        config_dict = dict(config_dict)
        for key, current in (
            ("optimum_neuron_version", optimum_neuron_version),
            ("neuronxcc_version", _neuronxcc_version()),
        ):
            recorded = config_dict.pop(key, "missing")
            if recorded != current:
                raise ValueError(
                    f"{key}={recorded!r} in the export config, but this host has {current!r}."
                )
        # Folders written before these fields existed have the head in their programs, and
        # one program per pass.
        config_dict.setdefault("head_on_host", False)
        config_dict.setdefault("layer_programs", False)
        if config_dict.get("ops_profile") is None:
            raise ValueError(
                "it records no ops_profile (the forms of products and attention its programs "
                "were traced with): it was exported by an earlier optimum-gemma3. Re-export "
                "the model."
            )
        serialized_key = config_dict.pop("_serialized_key", None)
        if serialized_key != cls.__name__:
            raise ValueError(f"_serialized_key={serialized_key!r}, expected {cls.__name__!r}.")
        return cls(**config_dict)

    def finalize(self, text_config) -> Gemma3NeuronConfig:
        """Fill automatic defaults from the model config, then validate. Returns self."""
        if self.context_encoding_buckets is None and _positive(self.max_context_length):
            smallest = SMALLEST_BUCKET
            if self.target in NEURON_TARGETS and text_config.head_dim > 128:
                smallest = SMALLEST_NEURON_BUCKET_HEAD_DIM_256
            self.context_encoding_buckets = default_buckets(self.max_context_length, smallest)
        self.validate(text_config)
        return self

    def validate(self, text_config) -> None:
        """Refuse values the graphs cannot honour, naming the field and the allowed range."""
        for field in ("batch_size", "sequence_length", "max_context_length", "tp_degree"):
            if not _positive(getattr(self, field)):
                raise ValueError(
                    f"{field} must be a positive integer, got {getattr(self, field)!r}."
                )
        limit = text_config.max_position_embeddings
        if self.sequence_length > limit:
            raise ValueError(
                f"sequence_length={self.sequence_length} exceeds the model's "
                f"max_position_embeddings={limit}: choose 1..{limit}."
            )
        if self.max_context_length > self.sequence_length:
            raise ValueError(
                f"max_context_length={self.max_context_length} must be <= "
                f"sequence_length={self.sequence_length}."
            )
        if self.target not in TARGETS:
            raise ValueError(
                f"Unknown target {self.target!r}: expected one of {', '.join(TARGETS)}."
            )
        TensorParallelLayout.for_config(text_config, self.tp_degree)  # names what fails
        if self.tp_degree > 1 and self.target in NEURON_TARGETS:
            raise ValueError(
                f"tp_degree={self.tp_degree} on target {self.target!r} is not built yet: the "
                "Neuron path through neuronx-distributed's parallel layers is missing (sharded "
                "weights must be per-core parameters there, not program inputs). Use "
                "tp_degree=1 on Neuron, or instance_type='cpu' for tensor parallelism."
            )
        if self.head_on_host and (self.target != "cpu" or self.tp_degree > 1):
            raise ValueError(
                "head_on_host=True needs target 'cpu' and tp_degree=1: elsewhere the head "
                "stays in the programs."
            )
        if self.layer_programs and not self.head_on_host:
            raise ValueError(
                "layer_programs=True needs head_on_host=True (target 'cpu', tp_degree=1): "
                "the program of the last layer ends at the final norm."
            )
        buckets = self.context_encoding_buckets
        if not buckets or any(not _positive(b) for b in buckets) or buckets != sorted(set(buckets)):
            raise ValueError(
                f"context_encoding_buckets={buckets!r} must be a non-empty, strictly increasing "
                "list of positive prompt lengths."
            )
        if buckets[-1] > self.max_context_length:
            raise ValueError(
                f"context_encoding_buckets={buckets} do not fit: the largest must be <= "
                f"max_context_length={self.max_context_length}."
            )
        if self.max_num_images is not None and not _positive(self.max_num_images):
            raise ValueError(
                f"max_num_images must be a positive integer (or None for a text-only "
                f"export), got {self.max_num_images!r}."
            )
        if self.on_device_sampling:
            raise ValueError("on_device_sampling=True is not supported yet: use False.")
        self._validate_speculation(text_config)
        self._validate_self_draft()

    def _validate_speculation(self, text_config) -> None:
        """`speculation_length` k > 0 adds a program that checks k drafted tokens per row;
        refuse shapes it cannot check exactly."""
        k = self.speculation_length
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"speculation_length must be an integer >= 0, got {k!r}.")
        if k == 0:
            return
        if self.tp_degree > 1:
            raise ValueError(
                f"speculation_length={k} with tp_degree={self.tp_degree}: speculative decoding "
                "rolls rejected drafts back in the caches this process holds; use tp_degree=1."
            )
        shortest = min(self.sequence_length, text_config.sliding_window)
        if k + 1 > shortest:
            raise ValueError(
                f"speculation_length={k}: k + 1 tokens must fit the shortest KV cache "
                f"({shortest} slots: sequence_length and sliding_window); lower it."
            )

    def _validate_self_draft(self) -> None:
        """`draft_quantization_dtype` adds the self-draft's programs: a known format, for an
        artifact that checks drafts and runs per-layer programs on the host."""
        dtype = self.draft_quantization_dtype
        if dtype is None:
            return
        if dtype not in DRAFT_DTYPES:
            raise ValueError(
                f"draft_quantization_dtype={dtype!r} is not a self-draft format: expected one "
                f"of {', '.join(DRAFT_DTYPES)} (or None for no self-draft)."
            )
        if not self.speculation_length:
            raise ValueError(
                f"draft_quantization_dtype={dtype!r} drafts tokens for speculative decoding: "
                "set speculation_length=k (drafts checked per step) as well."
            )
        if not self.layer_programs:
            raise ValueError(
                f"draft_quantization_dtype={dtype!r} needs per-layer programs (layer_programs: "
                "target 'cpu', tp_degree=1): the self-draft runs its layers from the host."
            )


def _neuronxcc_version() -> str | None:
    try:
        return get_neuronxcc_version()
    except ModuleNotFoundError:
        return None


def _plain(value):
    """JSON-ready form of a config value (dtypes by name, tuples as lists)."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, OpsProfile):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
