"""The Hugging Face Hub side of compiled models: model card, push, and download.

A compiled artifact folder goes to the Hub as is (programs under `compiled/`, weights,
configs, tokenizer) plus a generated `README.md` model card; the runtime reads only the
files `neuron_config.json` names, so the card never affects loading.

Downloads go through the HF cache (`snapshot_download`), so a second load, or a load
with `HF_HUB_OFFLINE=1`, reuses the files. Before fetching the (large) programs and
weights, `neuron_config.json` alone is fetched and checked, so a repo holding a plain
checkpoint, or programs built by other versions, is refused before gigabytes move.
huggingface_hub's errors are re-raised with the same class (so `except
RepositoryNotFoundError` keeps working) but a message that says what to do; the
original stays attached as `__cause__`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import (
    HfApi,
    ModelCard,
    ModelCardData,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from ..artifact.checks import check_host_runs, check_versions, load_neuron_config
from ..artifact.files import (
    MODEL_CARD_NAME,
    NEURON_CONFIG_NAME,
    PROGRAMS_DIR,
    RANK_WEIGHTS_DIR,
    TOKENIZER_FILES,
    ArtifactError,
    add_to_manifest,
    owned_files,
    refuse_overwriting,
    weights_name,
)
from ..compiler import backend_for_target
from ..constants import IMAGE_TASK, TASK
from ..paths import replaced_atomically

if TYPE_CHECKING:
    from ..artifact.neuron_config import Gemma3NeuronConfig

# The card's library: users load these repos through optimum-neuron's auto class (after
# `import optimum_gemma3`), and the folder format is optimum-neuron's (neuron_config.json).
# Without an explicit library the Hub would infer "transformers" from config.json and offer
# an AutoModelForCausalLM snippet that cannot load compiled programs.
LIBRARY_NAME = "optimum-neuron"
# Remote files a push replaces wholesale: programs of an earlier push (other buckets, say)
# must not linger for every download to fetch. Only `compiled/` and `weights/` (per-rank
# shards) are ours alone; other remote files (a LICENSE, a checkpoint's weight shards on
# the branch) are kept.
STALE_PATTERNS = [f"{PROGRAMS_DIR}/*", f"{RANK_WEIGHTS_DIR}/*"]
LOGIN_HINT = "pass token=... (a token that can read it) or log in with `hf auth login`"


# -- model card -----------------------------------------------------------------------------


def hub_repo_id(name: str | None) -> str | None:
    """`name` when it reads as a Hub repo id ("namespace/name") rather than a local path.

    A folder that exists here wins, as it does when exporting: the checkpoint was then
    read from disk and its Hub origin, if any, is unknown.
    """
    if not name or name.startswith((".", "/", "~")) or name.count("/") != 1:
        return None
    if Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def model_card(
    neuron_config: Gemma3NeuronConfig,
    repo_id: str,
    revision: str | None = None,
    has_tokenizer: bool = True,
    endpoint: str | None = None,
) -> ModelCard:
    """The generated README.md: Hub metadata, the export config and how to load the repo.

    `base_model` is set only when the source checkpoint was a Hub id, since the Hub links
    (and validates) it; a local path would leak a meaningless machine path.
    """
    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    base_model = hub_repo_id(neuron_config.checkpoint_id)
    target = neuron_config.target
    tags = list(dict.fromkeys(["optimum-neuron", "optimum-gemma3", "gemma3", "neuron", target]))
    data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        pipeline_tag=IMAGE_TASK if neuron_config.has_images else TASK,
        tags=tags,
    )
    body = _card_body(neuron_config, repo_id, revision, has_tokenizer, base_model, endpoint)
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def _card_body(
    nc: Gemma3NeuronConfig,
    repo_id: str,
    revision: str | None,
    has_tokenizer: bool,
    base_model: str | None,
    endpoint: str,
) -> str:
    recorded = nc.to_dict()
    source = f"[{base_model}]({endpoint}/{base_model})" if base_model else "A Gemma-3 checkpoint"
    if base_model and nc.checkpoint_revision:
        source += f" (revision `{nc.checkpoint_revision}`)"
    load_args = f'"{repo_id}"' + (f', revision="{revision}"' if revision else "")
    if has_tokenizer:
        tokenizer_args = load_args
    elif base_model:
        tokenizer_args = f'"{base_model}"'
    else:
        tokenizer_args = '"<the source checkpoint>"  # this repo holds no tokenizer files'
    rows = [
        ("batch_size", nc.batch_size),
        ("sequence_length (prompt + new tokens)", nc.sequence_length),
        ("max_context_length (longest prompt)", nc.max_context_length),
        ("context_encoding_buckets (prefill lengths)", nc.context_encoding_buckets),
        ("torch_dtype", nc.dtype_name),
        ("target", nc.target),
        ("tp_degree", nc.tp_degree),
        ("weights", "included" if weights_name(0, nc.tp_degree) in nc.artifact_files else
            f"loaded from `{nc.checkpoint_id}` at load time"),
        ("optimum-gemma3", recorded["optimum_gemma3_version"]),
        ("optimum-neuron", recorded["optimum_neuron_version"]),
        ("torch", recorded["torch_version"]),
        ("compiler", f"{recorded['compiler']} {recorded['compiler_version']}"),
    ]  # fmt: skip
    if nc.has_images:
        rows.insert(4, ("max_num_images (images per prompt)", nc.max_num_images))
    table = "\n".join(f"| {name} | `{value}` |" for name, value in rows)
    imports = (
        "import optimum_gemma3  # registers Gemma-3 with optimum-neuron\n"
        "from optimum.neuron import NeuronModelForCausalLM\n"
    )
    load = (
        f"model = NeuronModelForCausalLM.from_pretrained({load_args})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({tokenizer_args})\n"
    )
    return f"""# {repo_id.split("/")[-1]}

{source} compiled with optimum-gemma3, the Gemma-3 plugin of
[optimum-neuron](https://github.com/huggingface/optimum-neuron), for
{_target_text(nc.target)}: one static-shape program per prefill bucket and one decode program
(`{PROGRAMS_DIR}/`), with the weights they run on. Loading needs optimum-gemma3 installed and
compiles nothing. Use of the weights is subject to the license of the source checkpoint.

## Export configuration

| field | value |
|---|---|
{table}

The programs are tied to these versions: loading refuses another optimum-gemma3,
optimum-neuron, torch or compiler version. A call takes at most `batch_size` prompts of at
most `max_context_length` tokens; prompt plus new tokens must fit in `sequence_length`.
{_image_usage(load_args) if nc.has_images else ""}
## Usage

```python
{imports}from transformers import AutoTokenizer

{load}inputs = tokenizer(["The capital of France is"], return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=32)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
```

With a transformers pipeline:

```python
{imports}from transformers import AutoTokenizer, pipeline

{load}generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
print(generator("The capital of France is", max_new_tokens=32)[0]["generated_text"])
```
"""


def _image_usage(load_args: str) -> str:
    """The card's section on images, for an image-text-to-text export."""
    return f"""
## Usage with images

```python
from optimum_gemma3 import Gemma3NeuronModelForImageTextToText
from transformers import AutoProcessor, pipeline

model = Gemma3NeuronModelForImageTextToText.from_pretrained({load_args})
processor = AutoProcessor.from_pretrained({load_args})
pipe = pipeline("{IMAGE_TASK}", model=model, processor=processor)
messages = [{{"role": "user", "content": [
    {{"type": "image", "url": "photo.jpg"}},
    {{"type": "text", "text": "Describe this image."}},
]}}]
print(pipe(text=messages, max_new_tokens=64, return_full_text=False)[0]["generated_text"])
```

Text-only prompts work through the same model and the usage below.
"""


def _target_text(target: str) -> str:
    """The hardware a target runs on, for readers who do not know the instance families."""
    return {
        "cpu": "CPU (`cpu`, PyTorch AOTInductor)",
        "inf2": "AWS Inferentia2 (`inf2`)",
        "trn1": "AWS Trainium (`trn1`)",
        "trn2": "AWS Trainium2 (`trn2`)",
    }.get(target, f"`{target}`")


def write_model_card(folder: Path, card: ModelCard) -> Path:
    """Write README.md into `folder` by rename, so a symlinked one (as in an HF cache
    snapshot) is replaced, never written through into a shared cache blob. A README.md
    this project did not write is refused, not overwritten. Listed in the manifest first:
    interrupted in between, the next push still knows the card is its own."""
    refuse_overwriting(folder, [MODEL_CARD_NAME])
    add_to_manifest(folder, [MODEL_CARD_NAME])
    with replaced_atomically(folder / MODEL_CARD_NAME) as temporary:
        card.save(temporary)
    return folder / MODEL_CARD_NAME


def has_tokenizer_files(folder: Path) -> bool:
    """Whether the card can tell users to load the tokenizer from the pushed repo itself."""
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


# -- push -----------------------------------------------------------------------------------


def push_folder(
    folder: Path,
    neuron_config: Gemma3NeuronConfig,
    repository_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: bool | str | None = True,
    endpoint: str | None = None,
) -> str:
    """Create the repo (and branch), write the model card into `folder`, upload it all.

    Returns the URL of the commit (`{endpoint}/{repo_id}/commit/{sha}`): a permalink to
    exactly what was pushed; `from_pretrained(repo_id, revision=sha)` loads that state.
    """
    api = HfApi(endpoint=endpoint, token=token)
    # The Hub resolves a bare name into the token owner's namespace: use what it answers.
    repo_id = api.create_repo(repository_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    card = model_card(neuron_config, repo_id, revision, has_tokenizer_files(folder), api.endpoint)
    write_model_card(folder, card)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        revision=revision,
        commit_message=f"Upload Gemma-3 compiled for {neuron_config.target} with optimum-gemma3",
        allow_patterns=sorted(owned_files(folder)),  # never a user's file of the folder
        delete_patterns=STALE_PATTERNS,
    )
    return info.commit_url


# -- download -------------------------------------------------------------------------------


def download_compiled(
    repo_id: str, revision: str | None = None, token: bool | str | None = None
) -> Path:
    """The snapshot folder of a compiled model on the Hub, fetched through the HF cache.

    `neuron_config.json` comes first and is checked against this host (versions, SDK,
    ops profile) before the programs and weights are downloaded.
    """
    with _explained(repo_id, revision, token):
        config_file = hf_hub_download(repo_id, NEURON_CONFIG_NAME, revision=revision, token=token)
        _check_compatible(Path(config_file).parent, repo_id)
        return Path(snapshot_download(repo_id, revision=revision, token=token))


def _check_compatible(folder: Path, repo_id: str) -> None:
    """Refuse programs this host cannot run, from neuron_config.json alone."""
    try:
        neuron_config = load_neuron_config(folder)
        backend = backend_for_target(neuron_config.target)
        check_versions(neuron_config, backend.versions(), folder)
        check_host_runs(neuron_config, backend.runs_program_isa, folder)
    except ArtifactError as error:
        raise ArtifactError(f"Hub repo {repo_id!r} cannot be loaded here: {error}") from error


@contextmanager
def _explained(repo_id: str, revision: str | None, token: bool | str | None) -> Iterator[None]:
    """Re-raise huggingface_hub's download errors with what the user should do about them."""
    at = f" at revision {revision!r}" if revision else ""
    try:
        yield
    except HFValidationError as error:
        raise FileNotFoundError(
            f"{repo_id!r} is neither a local folder nor a Hub repo id ('namespace/name'): "
            "check the path."
        ) from error
    except GatedRepoError as error:  # before RepositoryNotFoundError: it is a subclass
        raise GatedRepoError(
            f"Hub repo {repo_id!r} is gated: request access on {constants.ENDPOINT}/{repo_id}, "
            f"then, once granted, {LOGIN_HINT}." + _token_note(token),
            response=error.response,
        ) from error
    except RepositoryNotFoundError as error:
        raise RepositoryNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub repo {repo_id!r} does not exist or "
            f"is private. Check the name; if it is private, {LOGIN_HINT}." + _token_note(token),
            response=error.response,
        ) from error
    except RevisionNotFoundError as error:
        raise RevisionNotFoundError(
            f"Revision {revision!r} does not exist in Hub repo {repo_id!r}: pass an existing "
            "branch, tag or commit sha (revision=None means 'main').",
            response=error.response,
        ) from error
    except LocalEntryNotFoundError as error:  # before EntryNotFoundError: it is a subclass
        cache = constants.HF_HUB_CACHE
        if constants.HF_HUB_OFFLINE:
            reason = "offline mode is on (HF_HUB_OFFLINE=1)"
            remedy = "download it once while online, or unset HF_HUB_OFFLINE"
        else:
            reason = f"the Hub ({constants.ENDPOINT}) could not be reached"
            remedy = "check the network connection and HF_ENDPOINT"
        raise LocalEntryNotFoundError(
            f"Cannot load Hub repo {repo_id!r}{at}: {reason} and it is not in the Hugging Face "
            f"cache ({cache}); {remedy}."
        ) from error
    except EntryNotFoundError as error:  # only the neuron_config.json probe can raise it
        raise ArtifactError(
            f"Hub repo {repo_id!r}{at} has no {NEURON_CONFIG_NAME}: it is not a model compiled "
            "by optimum-gemma3 (a plain checkpoint?). Compile it with "
            f"from_pretrained({repo_id!r}, export=True, batch_size=..., sequence_length=...), "
            "or load a repo created by push_to_hub."
        ) from error


def _token_note(token: bool | str | None) -> str:
    """With an explicit token, "log in" is not the fix: the token itself lacks access."""
    if isinstance(token, str):
        return " (A token was sent: it may lack access to this repo.)"
    return ""
