"""The artifact folder: file names, atomic writes and integrity checks.

config.json              the checkpoint's HF config (multimodal configs kept whole)
neuron_config.json       export config, versions and a checksum of every program
compiled/prefill_<N>.pt2 one program per prefill bucket (suffix set by the backend)
compiled/decode.pt2      the one-token program
model.safetensors        the decoder's weights in the export dtype (when exported with
                         load_weights=True; otherwise loaded from checkpoint_id)
weights/tp_rank_<r>.safetensors
                         instead of model.safetensors with tp_degree > 1: rank r's shard
tokenizer files, generation_config.json, README.md (when available)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

PROGRAMS_DIR = "compiled"
RANK_WEIGHTS_DIR = "weights"
WEIGHTS_NAME = "model.safetensors"
NEURON_CONFIG_NAME = "neuron_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


class ArtifactError(RuntimeError):
    """A compiled folder that cannot be used: missing, corrupt or built by other versions."""


def weights_name(rank: int, tp_degree: int) -> str:
    """The weights file of one rank: the whole model when there is one rank."""
    return WEIGHTS_NAME if tp_degree == 1 else f"{RANK_WEIGHTS_DIR}/tp_rank_{rank}.safetensors"


def prefill_program_name(bucket: int, suffix: str) -> str:
    return f"{PROGRAMS_DIR}/prefill_{bucket}{suffix}"


def decode_program_name(suffix: str) -> str:
    return f"{PROGRAMS_DIR}/decode{suffix}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file(folder: Path, name: str, sha256: str | None = None) -> Path:
    """The path of `name` in `folder`, refusing a missing file or one whose checksum differs."""
    path = folder / name
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: the compiled folder {folder} is incomplete. Re-export it, or "
            "copy the whole folder again."
        )
    if sha256 is not None and sha256_file(path) != sha256:
        raise ArtifactError(
            f"{path} is corrupt: its sha256 does not match the one recorded in "
            f"{NEURON_CONFIG_NAME} at export. Re-export the model or copy the file again."
        )
    return path


def write_folder_atomically(destination: Path, fill: Callable[[Path], None]) -> Path:
    """Create `destination` by filling a temporary sibling and renaming it into place.

    An interruption leaves at most a hidden `.tmp-*` sibling, never a folder that looks
    complete; an existing `destination` is replaced whole, only once the new one is ready.
    """
    destination = Path(destination).absolute()
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{destination} exists and is not a folder.")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{destination.name}-", dir=destination.parent))
    try:
        fill(staging)
        if destination.exists():
            retired = destination.with_name(f".old-{destination.name}-{uuid.uuid4().hex[:8]}")
            os.replace(destination, retired)
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def copy_tree_files(source: Path, destination: Path) -> None:
    """Copy every file of an artifact folder, keeping the sub-folder layout."""
    for path in source.rglob("*"):
        if path.is_file():
            target = destination / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
