"""The artifact folder: file names, how a folder is saved, and integrity checks.

config.json              the checkpoint's HF config (multimodal configs kept whole)
neuron_config.json       export config, versions and a checksum of every program
compiled/prefill_<N>.pt2 one program per prefill bucket (suffix set by the backend), or
compiled/prefill.pt2     one for every prompt length (`prefill_any_length`)
compiled/decode.pt2      the one-token program
compiled/verify.pt2      with speculation_length k: k + 1 tokens per row (drafts checked)
compiled/<pass>-<part>.pt2
                         with `layer_programs`, instead of the whole-stack programs above:
                         per pass (prefill, decode, verify) one program per layer type and
                         one for the last layer with the final norm (part `last`)
compiled/vision.pt2      image-text-to-text only: one image's pixels to its features
model.safetensors        the decoder's weights in the export dtype (when exported with
                         load_weights=True; otherwise loaded from checkpoint_id)
weights/tp_rank_<r>.safetensors
                         instead of model.safetensors with tp_degree > 1: rank r's shard
vision.safetensors       image-text-to-text only: the vision tower and projector (one
                         copy whatever tp_degree: the vision program runs on one rank)
tokenizer files, generation_config.json, README.md (when available); processor files
(preprocessor_config.json, processor_config.json) for image-text-to-text

`neuron_config.json` is also the manifest: its `artifact_files` lists every file this
project wrote into the folder (with a checksum for the programs). A save replaces only
files the folder's previous manifest lists, and leaves every other file alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath

from ..paths import replaced_atomically

PROGRAMS_DIR = "compiled"
RANK_WEIGHTS_DIR = "weights"
WEIGHTS_NAME = "model.safetensors"
VISION_WEIGHTS_NAME = "vision.safetensors"
NEURON_CONFIG_NAME = "neuron_config.json"
CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
MODEL_CARD_NAME = "README.md"
# The export config's class name, which optimum-neuron records as `_serialized_key`.
MANIFEST_KEY = "Gemma3NeuronConfig"
# A save writes here first, inside the destination (so moves are renames on one filesystem).
STAGING_PREFIX = ".optimum-gemma3-save-"
# Where a save keeps the folder's previous manifest while it moves files in: if it is
# interrupted, the next save still knows which files were this project's.
PREVIOUS_MANIFEST = "previous-neuron_config.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# What `AutoProcessor` needs beside the tokenizer files: copied by image-text-to-text exports.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Written by every export, though manifests of earlier releases listed only programs and
# weights: counted as this project's files in a folder whose manifest omits them.
ALWAYS_WRITTEN = (CONFIG_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES)


class ArtifactError(RuntimeError):
    """A compiled folder that cannot be used: missing, corrupt or built by other versions."""


def weights_name(rank: int, tp_degree: int) -> str:
    """The weights file of one rank: the whole model when there is one rank."""
    return WEIGHTS_NAME if tp_degree == 1 else f"{RANK_WEIGHTS_DIR}/tp_rank_{rank}.safetensors"


def prefill_program_name(bucket: int | None, suffix: str) -> str:
    """The prefill program of one bucket, or (None) the one that serves every length."""
    return f"{PROGRAMS_DIR}/prefill{'' if bucket is None else f'_{bucket}'}{suffix}"


def decode_program_name(suffix: str) -> str:
    return f"{PROGRAMS_DIR}/decode{suffix}"


def verify_program_name(suffix: str) -> str:
    return f"{PROGRAMS_DIR}/verify{suffix}"


def layer_program_name(kind: str, part: str, suffix: str) -> str:
    """The per-layer program `part` (a layer type, or the last layer) of pass `kind`."""
    return f"{PROGRAMS_DIR}/{kind}-{part}{suffix}"


def vision_program_name(suffix: str) -> str:
    return f"{PROGRAMS_DIR}/vision{suffix}"


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


def files_below(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted relative POSIX names."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def owned_files(folder: Path) -> set[str]:
    """The files of `folder` this project wrote: those its manifest (`neuron_config.json`)
    lists; without one, those an interrupted save was writing there (the manifests it left
    in its staging folder). None for a manifest written by anything else (optimum-neuron's
    own exports use the same file name).

    A save moves files in only once the folder's manifest is gone and lists them all in
    the manifest it writes last, so a folder that has one owns nothing else: the staging
    manifest of a save interrupted before its first move names files never written here,
    and a user's file of that name is the user's."""
    manifests = [folder / NEURON_CONFIG_NAME]
    if not manifests[0].exists():
        for staging in folder.glob(f"{STAGING_PREFIX}*"):
            manifests += [staging / NEURON_CONFIG_NAME, staging / PREVIOUS_MANIFEST]
    return set().union(*(_listed(manifest, folder) for manifest in manifests))


def _listed(manifest_path: Path, folder: Path) -> set[str]:
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(manifest, dict) or manifest.get("_serialized_key") != MANIFEST_KEY:
        return set()
    listed = set(manifest.get("artifact_files") or {})
    escaping = sorted(name for name in listed if not _inside_folder(name))
    if escaping:  # a save would replace or delete them, and a copy read them
        raise ArtifactError(
            f"{manifest_path} lists {', '.join(map(repr, escaping))}, outside the folder: "
            "optimum-gemma3 writes only files inside it, so this manifest was edited or "
            "forged. Nothing was changed; remove the folder's model files and export again."
        )
    if CONFIG_NAME not in listed:  # an earlier release's manifest
        listed |= {name for name in ALWAYS_WRITTEN if (folder / name).is_file()}
    return listed | {NEURON_CONFIG_NAME}


def _inside_folder(name: str) -> bool:
    """Whether a manifest's name is a relative path that stays inside its folder."""
    path = PurePosixPath(name)
    return bool(path.parts) and not path.is_absolute() and ".." not in path.parts


def looks_like_unfinished_save(folder: Path) -> bool:
    """A folder a save was interrupted in: no manifest, but a staging folder or programs.

    A save moves the old manifest away before it moves any file in and writes the new one
    last, so a folder without one is never loaded as a mix of two artifacts."""
    if (folder / NEURON_CONFIG_NAME).exists():
        return False
    return (folder / PROGRAMS_DIR).is_dir() or any(folder.glob(f"{STAGING_PREFIX}*"))


def save_artifact(destination: Path, write: Callable[[Path], None]) -> Path:
    """Write an artifact into `destination` (created if missing) without touching files
    this project did not write.

    `write(staging)` fills an empty staging folder inside `destination` with every file of
    the artifact, `neuron_config.json` included. Before anything in `destination` changes,
    a file to be written that exists there but is not listed by its manifest (a user's
    file) is refused by name. Then: the old manifest moves into the staging folder first,
    files move in by rename, files the old manifest listed and the new artifact lacks
    (stale programs of other buckets, rank shards) are removed, and the new manifest comes
    last. Interrupted, the folder holds the previous artifact intact (before the old
    manifest moved) or no manifest, which loading refuses (`looks_like_unfinished_save`);
    a later save finishes the job, knowing from the staging folder's manifests which
    files were this project's.
    """
    destination = Path(destination).absolute()
    refuse_overwriting(destination, [])
    destination.mkdir(parents=True, exist_ok=True)
    # Staging folders of interrupted saves say which files were this project's: kept
    # until this save has finished, in case it is interrupted too.
    leftovers = list(destination.glob(f"{STAGING_PREFIX}*"))
    owned = owned_files(destination)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=destination))
    try:
        write(staging)
        names = files_below(staging)
        refuse_overwriting(destination, names, owned)
        if (destination / NEURON_CONFIG_NAME).exists():
            os.replace(destination / NEURON_CONFIG_NAME, staging / PREVIOUS_MANIFEST)
        for name in names:
            if name != NEURON_CONFIG_NAME:
                (destination / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / name, destination / name)
        _remove(destination, owned - set(names))
        os.replace(staging / NEURON_CONFIG_NAME, destination / NEURON_CONFIG_NAME)
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


def refuse_overwriting(
    destination: Path, names: Iterable[str], owned: set[str] | None = None
) -> None:
    """Raise if saving `names` into `destination` would overwrite a file this project did
    not write there (`owned`: the files its manifest lists), or needs a folder where a
    file is."""
    if destination.exists() and not destination.is_dir():
        raise ArtifactError(
            f"{destination} is a file, not a folder: choose a folder to save the model in."
        )
    if owned is None:
        owned = owned_files(destination)
    conflicts = []
    for name in names:
        path = destination / name
        blocked = [p for p in path.parents if p != destination and p.is_relative_to(destination)]
        if name not in owned and (path.exists() or path.is_symlink()):
            conflicts.append(name)
        elif any(p.exists() and not p.is_dir() for p in blocked):
            conflicts.append(name)
    if conflicts:
        raise ArtifactError(
            f"Not saving into {destination}: it holds {', '.join(conflicts)}, which this "
            f"project did not write ({NEURON_CONFIG_NAME} does not list them), and the model "
            "would overwrite them. Move them away or choose another folder; nothing was changed."
        )


def _remove(destination: Path, stale: set[str]) -> None:
    """Remove files an earlier save wrote, then the sub-folders that held only them."""
    for name in sorted(stale):
        (destination / name).unlink(missing_ok=True)
    for folder in (PROGRAMS_DIR, RANK_WEIGHTS_DIR):
        with contextlib.suppress(OSError):  # not empty: a user's file stays, and its folder
            (destination / folder).rmdir()


def copy_files(
    source: Path, names: Iterable[str], staging: Path, reuse: Path | None = None
) -> None:
    """Copy the named files of `source` into `staging`, keeping sub-folders (copies keep
    modification times).

    A file `reuse` (the save's destination) already holds unchanged, by rsync's quick
    check (size and modification time), is hard-linked from there instead: re-saving or
    pushing a folder that was just saved does not copy gigabytes again, and the link
    shares the file only with the one it is about to replace.
    """
    for name in names:
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if reuse is not None and _same_file_stat(source / name, reuse / name):
            try:
                os.link(reuse / name, target)
                continue
            except OSError:
                pass
        shutil.copy2(source / name, target)


def _same_file_stat(a: Path, b: Path) -> bool:
    try:
        first, second = a.stat(), b.stat()
    except OSError:
        return False
    return (first.st_size, first.st_mtime_ns) == (second.st_size, second.st_mtime_ns)


def add_to_manifest(folder: Path, names: Iterable[str]) -> None:
    """List more files of `folder` as this project's (the model card a push writes)."""
    path = folder / NEURON_CONFIG_NAME
    manifest = json.loads(path.read_text())
    manifest["artifact_files"] = {**manifest.get("artifact_files", {}), **dict.fromkeys(names)}
    with replaced_atomically(path) as temporary:
        temporary.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
