"""Checkpoint + export config -> a complete artifact folder.

The one entry point is `export_to_folder`: resolve the checkpoint (local folder or Hub id),
validate the export config against the model config, choose the ops profile the graphs
are traced with (`ops_profile_for`), compile one program per prefill bucket plus the
decode program (through the compile cache), write the weights in the
export dtype, copy the tokenizer and generation config, and write `neuron_config.json`
last, listing every file written. An `image-text-to-text` export (`max_num_images` set)
also compiles the vision program, writes the vision weights and copies the processor.
The caller decides where the folder goes; it is written as every save is
(`artifact.files.save_artifact`).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, GenerationConfig

from ..artifact.files import (
    PROCESSOR_FILES,
    TOKENIZER_FILES,
    VISION_WEIGHTS_NAME,
    decode_program_name,
    files_below,
    prefill_program_name,
    save_artifact,
    sha256_file,
    verify_program_name,
    vision_program_name,
    weights_name,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..graphs import Gemma3Decoder, text_config
from ..graphs.config import ImageTokens
from ..graphs.layers import SDPA_QUERY_BLOCK, SKINNY_MAX_ROWS
from ..graphs.ops import OpsProfile
from ..graphs.parallel import tracing_process_group
from ..graphs.program import (
    DECODE,
    PREFILL,
    VERIFY,
    VISION,
    GraphProgram,
    VisionProgram,
    example_inputs,
    prefill_dynamic_shapes,
    vision_example_inputs,
)
from ..graphs.vision import Gemma3VisionEncoder
from ..weights import rank_state_dicts, resolve_checkpoint, vision_state_dict
from . import CPU_TARGETS, backend_for_target
from .cache import compile_cached, program_key

logger = logging.getLogger(__name__)


def ops_profile_for(target: str) -> OpsProfile:
    """The ops profile of programs compiled for `target`: on `cpu`, the fastest forms this
    host has (the programs will run on a CPU; the runtime checks at load that its host
    can run them); on Neuron, the plain ops, whose device forms the Neuron compiler picks."""
    return OpsProfile.for_host() if target in CPU_TARGETS else OpsProfile()


def export_to_folder(
    model_id: str | Path,
    neuron_config: Gemma3NeuronConfig,
    destination: Path,
    load_weights: bool = True,
    revision: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Export `model_id` into `destination`, replacing only files an earlier export wrote."""
    checkpoint = resolve_checkpoint(model_id, revision, token)
    config = AutoConfig.from_pretrained(checkpoint)
    text = text_config(config)
    neuron_config.checkpoint_id = str(model_id)
    neuron_config.checkpoint_revision = revision
    neuron_config.finalize(text)
    backend = backend_for_target(neuron_config.target)
    versions = backend.versions()
    neuron_config.compiler = versions["compiler"]
    neuron_config.compiler_version = versions["compiler_version"]
    neuron_config.ops_profile = ops_profile_for(neuron_config.target)
    neuron_config.program_isa = backend.program_isa()
    if neuron_config.has_images:
        check_image_export(config, checkpoint, neuron_config)
    if neuron_config.speculation_length:
        check_speculation_export(neuron_config)

    def fill(folder: Path) -> None:
        config.save_pretrained(folder)
        _copy_generation_files(checkpoint, folder, neuron_config.has_images)
        neuron_config.artifact_files = _compile_programs(
            config, neuron_config, backend, versions, folder
        )
        if load_weights:
            _write_weights(checkpoint, text, neuron_config, folder)
        if neuron_config.has_images:  # small, and the runtime needs it: always written
            _write_vision_weights(checkpoint, config, neuron_config, folder)
        for name in files_below(folder):  # the manifest: every file written (see artifact)
            neuron_config.artifact_files.setdefault(name, None)
        neuron_config.save_pretrained(folder)

    return save_artifact(destination, fill)


def check_image_export(config, checkpoint: Path, neuron_config) -> None:
    """Refuse an image-text-to-text export that could not take its images: a text-only
    checkpoint, no processor to make inputs with, prompts too short for the images."""
    image_tokens = ImageTokens.of(config)
    if not (checkpoint / PROCESSOR_FILES[0]).is_file():
        raise ValueError(
            f"{checkpoint} has no {PROCESSOR_FILES[0]}: an image-text-to-text export ships "
            "the processor that turns images and chat messages into model inputs. Save it "
            "into the checkpoint folder first (AutoProcessor.from_pretrained(<hub id>)"
            ".save_pretrained(folder))."
        )
    needed = neuron_config.max_num_images * image_tokens.per_image
    if needed > neuron_config.max_context_length:
        raise ValueError(
            f"max_num_images={neuron_config.max_num_images} images take {needed} image tokens "
            f"({image_tokens.per_image} each), more than max_context_length="
            f"{neuron_config.max_context_length}: lower max_num_images or raise "
            "max_context_length / sequence_length."
        )


def check_speculation_export(neuron_config) -> None:
    """Refuse a verify program whose positions would not compute a decode step's numbers:
    only the `cpu` kernels sum a product's rows each in one order, and only up to
    `SKINNY_MAX_ROWS` rows (batch_size x (speculation_length + 1))."""
    k, batch = neuron_config.speculation_length, neuron_config.batch_size
    if not neuron_config.ops_profile.skinny_linear:
        raise ValueError(
            f"speculation_length={k} needs the cpu backend's kernels (target 'cpu' on a "
            "host with AVX2, FMA and a C++ compiler): their products give each verified "
            "position the numbers of a one-token step, which keeps speculative tokens "
            "identical to plain greedy decoding. Export with speculation_length=0 here."
        )
    if batch * (k + 1) > SKINNY_MAX_ROWS:
        raise ValueError(
            f"batch_size={batch} x (speculation_length={k} + 1) = {batch * (k + 1)} verified "
            f"tokens exceed {SKINNY_MAX_ROWS}, the rows the cpu kernels sum each in one order: "
            f"choose speculation_length <= {SKINNY_MAX_ROWS // batch - 1} for this batch_size."
        )


def _compile_programs(config, neuron_config, backend, versions, folder: Path) -> dict[str, str]:
    """Compile (or fetch from the compile cache) every program; return their checksums."""
    tp_degree = neuron_config.tp_degree
    text = text_config(config)
    image_tokens = ImageTokens.of(config) if neuron_config.has_images else None
    decoder = Gemma3Decoder.skeleton(
        text,
        neuron_config.batch_size,
        neuron_config.sequence_length,
        neuron_config.torch_dtype,
        tp_degree,
        neuron_config.ops_profile,
        image_tokens,
    )
    suffix = backend.program_suffix
    buckets = neuron_config.context_encoding_buckets
    if neuron_config.prefill_any_length:  # `length`: the longest prompt it takes
        jobs = [(PREFILL, buckets[-1], prefill_program_name(None, suffix))]
    else:
        jobs = [(PREFILL, b, prefill_program_name(b, suffix)) for b in buckets]
    jobs.append((DECODE, 1, decode_program_name(suffix)))
    if neuron_config.speculation_length:
        jobs.append((VERIFY, neuron_config.speculation_length + 1, verify_program_name(suffix)))
    if image_tokens is not None:
        jobs.append((VISION, 1, vision_program_name(suffix)))
    (folder / jobs[0][2]).parent.mkdir(parents=True, exist_ok=True)
    checksums = {}
    shape = {
        "batch_size": neuron_config.batch_size,
        "sequence_length": neuron_config.sequence_length,
        "dtype": neuron_config.dtype_name,
        "tp_degree": neuron_config.tp_degree,
        "target": neuron_config.target,
        "head_on_host": neuron_config.head_on_host,
        "ops_profile": neuron_config.ops_profile.to_dict(),
        "image_tokens": None
        if image_tokens is None
        else [image_tokens.token_id, image_tokens.per_image],
    }
    # One program serves every rank; tracing a sharded graph needs a process group.
    group = tracing_process_group() if tp_degree > 1 else contextlib.nullcontext()
    with group:
        for kind, length, name in tqdm(jobs, desc="compile", unit="graph"):
            graph = {"kind": kind, "length": length, **shape}
            if kind == VISION:  # one image: the batch, cache and rank shapes do not apply
                encoder = Gemma3VisionEncoder.skeleton(
                    config, neuron_config.torch_dtype, neuron_config.ops_profile
                )
                kept = ("dtype", "target", "ops_profile", "image_tokens")
                graph = {"kind": kind, "vision_config": config.vision_config.to_dict()}
                graph.update({name: shape[name] for name in kept})
                program, inputs = VisionProgram(encoder), vision_example_inputs(encoder)
            else:
                program = GraphProgram(decoder, kind, with_head=not neuron_config.head_on_host)
                inputs, dynamic = _graph_inputs(decoder, kind, length, neuron_config)
            key = program_key(text.to_dict(), graph, versions)
            hit = compile_cached(
                key,
                backend.program_suffix,
                folder / name,
                lambda path, p=program, i=inputs, d=dynamic: backend.compile(p, i, path, d),
            )
            logger.info("%s: %s", name, "from compile cache" if hit else "compiled")
            checksums[name] = sha256_file(folder / name)
    return checksums


def _graph_inputs(decoder, kind: str, length: int, neuron_config) -> tuple:
    """A decoder program's example inputs and `dynamic_shapes`: static shapes, except the
    prefill that serves every prompt length (`prefill_any_length`) up to `length`."""
    if kind != PREFILL or not neuron_config.prefill_any_length:
        return example_inputs(decoder, kind, length), None
    # An example of two blocks where the range has them: a one-block example would let
    # tracing treat the block count as the constant 1.
    block = SDPA_QUERY_BLOCK
    example = example_inputs(decoder, kind, block * min(2, -(-length // block)))
    if length <= block:
        return example, None
    return example, prefill_dynamic_shapes(example, length)


def _write_weights(checkpoint: Path, text, neuron_config, folder: Path) -> None:
    """Each rank's tensors, renamed, cast and checked against its graph (the manifest lists
    them without a checksum: safetensors checks its own layout)."""
    for rank, shard in enumerate(rank_state_dicts(checkpoint, text, neuron_config)):
        name = weights_name(rank, neuron_config.tp_degree)
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        save_file(shard, folder / name, metadata={"format": "pt"})


def _write_vision_weights(checkpoint: Path, config, neuron_config, folder: Path) -> None:
    dtype = neuron_config.torch_dtype
    encoder = Gemma3VisionEncoder.skeleton(config, dtype)
    tensors = vision_state_dict(checkpoint, encoder, dtype)
    save_file(tensors, folder / VISION_WEIGHTS_NAME, metadata={"format": "pt"})


def _copy_generation_files(checkpoint: Path, folder: Path, with_processor: bool) -> None:
    for name in TOKENIZER_FILES + (PROCESSOR_FILES if with_processor else ()):
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, folder / name)
    try:
        GenerationConfig.from_pretrained(checkpoint).save_pretrained(folder)
    except OSError:
        logger.info("%s has no generation_config.json", checkpoint)
