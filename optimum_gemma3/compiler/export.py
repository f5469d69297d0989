"""Checkpoint + export config -> a complete artifact folder.

The one entry point is `export_to_folder`: resolve the checkpoint (local folder or Hub id),
validate the export config against the model config, choose the ops profile the graphs
are traced with (`ops_profile_for`), compile the prefill program(s) and the decode
program (through the compile cache, side by side on the CPU's cores), write the weights
in the export dtype, copy the tokenizer and generation config, and write `neuron_config.json`
last, listing every file written. An `image-text-to-text` export (`max_num_images` set)
also compiles the vision program, writes the vision weights and copies the processor.
The caller decides where the folder goes; it is written as every save is
(`artifact.files.save_artifact`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
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
    layer_program_name,
    prefill_program_name,
    save_artifact,
    sha256_file,
    verify_program_name,
    vision_program_name,
    weights_name,
)
from ..artifact.neuron_config import Gemma3NeuronConfig
from ..graphs import Gemma3Decoder, kernels, text_config
from ..graphs.config import ImageTokens
from ..graphs.draft import quantize_projections
from ..graphs.layers import SKINNY_MAX_ROWS
from ..graphs.ops import OpsProfile
from ..graphs.parallel import tracing_process_group
from ..graphs.program import (
    DECODE,
    DRAFT,
    PREFILL,
    VERIFY,
    VISION,
    GraphProgram,
    LayerProgram,
    VisionProgram,
    layer_parts,
    traced_inputs,
    vision_example_inputs,
)
from ..graphs.vision import Gemma3VisionEncoder
from ..weights import rank_state_dicts, resolve_checkpoint, vision_state_dict
from . import CPU_TARGETS, backend_for_target
from .cache import fetch_cached, program_key, store_cached

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
    # Per-layer programs take the prefill that serves every length (the cpu profile's).
    neuron_config.layer_programs &= neuron_config.prefill_any_length

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


@dataclass(frozen=True)
class ProgramJob:
    """One program of an export: its graph kind, length (prefill: the longest prompt it
    takes; verify: tokens per row), file name in the folder and, for a per-layer program,
    its part of the pass (see `graphs.program.LayerProgram`)."""

    kind: str
    length: int
    name: str
    part: str | None = None


def _program_jobs(text, neuron_config, suffix: str) -> list[ProgramJob]:
    buckets = neuron_config.context_encoding_buckets
    k = neuron_config.speculation_length
    if neuron_config.layer_programs:
        passes = {PREFILL: buckets[-1], DECODE: 1, **({VERIFY: k + 1} if k else {})}
        if neuron_config.draft_quantization_dtype:
            passes[DRAFT] = 1
        jobs = [
            ProgramJob(kind, length, layer_program_name(kind, part, suffix), part)
            for kind, length in passes.items()
            for part in layer_parts(text, kind)
        ]
    else:
        if neuron_config.prefill_any_length:
            jobs = [ProgramJob(PREFILL, buckets[-1], prefill_program_name(None, suffix))]
        else:
            jobs = [ProgramJob(PREFILL, b, prefill_program_name(b, suffix)) for b in buckets]
        jobs.append(ProgramJob(DECODE, 1, decode_program_name(suffix)))
        if k:
            jobs.append(ProgramJob(VERIFY, k + 1, verify_program_name(suffix)))
    if neuron_config.has_images:
        jobs.append(ProgramJob(VISION, 1, vision_program_name(suffix)))
    return jobs


def _graph_description(job: ProgramJob, config, neuron_config) -> dict:
    """What decides a program beside the text config and versions: its compile-cache key."""
    image_tokens = ImageTokens.of(config) if neuron_config.has_images else None
    shape = {
        "dtype": neuron_config.dtype_name,
        "target": neuron_config.target,
        "ops_profile": neuron_config.ops_profile.to_dict(),
        "image_tokens": None
        if image_tokens is None
        else [image_tokens.token_id, image_tokens.per_image],
    }
    if job.kind == VISION:  # one image: the batch, cache and rank shapes do not apply
        return {"kind": job.kind, "vision_config": config.vision_config.to_dict(), **shape}
    return {
        "kind": job.kind,
        "part": job.part,
        "length": job.length,
        "batch_size": neuron_config.batch_size,
        "sequence_length": neuron_config.sequence_length,
        "tp_degree": neuron_config.tp_degree,
        "head_on_host": neuron_config.head_on_host,
        **shape,
    }


def _compile_programs(config, neuron_config, backend, versions, folder: Path) -> dict[str, str]:
    """Fetch every program from the compile cache or compile it; return their checksums.

    Programs missing from the cache compile side by side, one process per CPU core: each
    compile is mostly one core's work (Inductor's Python, then g++).
    """
    suffix = backend.program_suffix
    text = text_config(config)
    jobs = _program_jobs(text, neuron_config, suffix)
    (folder / jobs[0].name).parent.mkdir(parents=True, exist_ok=True)
    keys = {
        job: program_key(text.to_dict(), _graph_description(job, config, neuron_config), versions)
        for job in jobs
    }
    with tqdm(total=len(jobs), desc="compile", unit="graph") as bar:
        missing = []
        for job in jobs:
            if fetch_cached(keys[job], suffix, folder / job.name):
                logger.info("%s: from compile cache", job.name)
                bar.update()
            else:
                missing.append(job)
        for job in _compile_side_by_side(missing, config, neuron_config, folder):
            store_cached(keys[job], suffix, folder / job.name)
            logger.info("%s: compiled", job.name)
            bar.update()
    return {job.name: sha256_file(folder / job.name) for job in jobs}


def _compile_side_by_side(jobs: list[ProgramJob], config, neuron_config, folder: Path):
    """Compile `jobs` into `folder`, yielding each as it is done: one share in this
    process, the others meanwhile in worker processes (one per other CPU core, each
    compiling its share in turn). Shares are dealt out in turn, so a share gets jobs of
    every kind of pass.

    Workers are fresh interpreters (`python -m optimum_gemma3.compiler.worker`), not
    `multiprocessing` ones: its spawn re-runs the caller's main script, and scripts call
    `export` without an `if __name__ == "__main__"` guard.
    """
    count = max(1, min(len(jobs), os.cpu_count() or 1))
    own, *shares = (jobs[i::count] for i in range(count))
    started = [_start_worker(share, config, neuron_config, folder) for share in shares]
    try:
        for job in own:
            compile_program(job, config, neuron_config, folder)
            yield job
        for share, (process, log) in zip(shares, started, strict=True):
            if process.wait() != 0:
                log.seek(0)
                names = ", ".join(job.name for job in share)
                raise RuntimeError(
                    f"Compiling {names} failed in a worker process:\n{log.read()[-4000:]}"
                )
            yield from share
    finally:
        for process, log in started:
            process.kill()
            process.wait()
            log.close()


def _start_worker(jobs: list[ProgramJob], config, neuron_config, folder: Path):
    """A worker process compiling `jobs` (given by pickle on its stdin), and its log file."""
    log = tempfile.TemporaryFile("w+")
    process = subprocess.Popen(
        [sys.executable, "-m", "optimum_gemma3.compiler.worker"],
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=False,
    )
    process.stdin.write(pickle.dumps((jobs, config, neuron_config, folder)))
    process.stdin.close()
    return process, log


def compile_program(job: ProgramJob, config, neuron_config, folder: Path) -> None:
    """Trace and compile one program into `folder` (in the exporting process or a worker)."""
    backend = backend_for_target(neuron_config.target)
    ops = neuron_config.ops_profile
    if ops.uses_kernels:
        kernels.load()  # the graphs call them: a worker process loads them itself
    if job.kind == VISION:
        encoder = Gemma3VisionEncoder.skeleton(config, neuron_config.torch_dtype, ops)
        backend.compile(VisionProgram(encoder), vision_example_inputs(encoder), folder / job.name)
        return
    decoder = Gemma3Decoder.skeleton(
        text_config(config),
        neuron_config.batch_size,
        neuron_config.sequence_length,
        neuron_config.torch_dtype,
        neuron_config.tp_degree,
        ops,
        ImageTokens.of(config) if neuron_config.has_images else None,
    )
    if job.kind == DRAFT:
        quantize_projections(decoder)
    if job.part is None:
        program = GraphProgram(decoder, job.kind, with_head=not neuron_config.head_on_host)
    else:
        program = LayerProgram(decoder, job.kind, job.part)
    inputs, dynamic = traced_inputs(decoder, job.kind, job.length, job.part)
    # One program serves every rank; tracing a sharded graph needs a process group.
    sharded = neuron_config.tp_degree > 1
    with tracing_process_group() if sharded else contextlib.nullcontext():
        backend.compile(program, inputs, folder / job.name, dynamic)


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
