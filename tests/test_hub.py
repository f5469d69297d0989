"""Runs against a local loopback server (tests/hub_server.py), not the real Hub.

push_to_hub and from_pretrained("user/repo") end to end: what lands on the Hub (artifact
folder plus a model card), loading through the HF cache with both our class and
optimum-neuron's auto class, branches, and the error messages for every way a download
fails (missing, private, gated, bad revision, offline, unreachable, a plain checkpoint,
programs built by other versions).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants, hf_hub_download, list_repo_files
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    LocalTokenNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import reset_sessions

from optimum_gemma3 import Gemma3NeuronModelForCausalLM
from optimum_gemma3.artifact.files import ArtifactError
from optimum_gemma3.integration.hub import hub_repo_id, model_card
from tests.test_artifacts import ARTIFACT_FILES, SHAPE
from tests.test_parity import left_padded_batch

if TYPE_CHECKING:
    from tests.hub_server import LocalHub

# The same shape as tests/test_artifacts.py: the compile cache already holds its programs.
NEW_TOKENS = 24
# Files a push rewrites, and a file created the ordinary way: their permissions match.
CARD_AND_PROBE = ("README.md", "neuron_config.json", "probe")


@pytest.fixture(scope="module")
def exported(tiny_checkpoints) -> tuple[Gemma3NeuronModelForCausalLM, torch.Tensor]:
    """The 4b-shaped tiny model exported once for the module, and its greedy tokens."""
    source = tiny_checkpoints("4b")
    config = Gemma3NeuronModelForCausalLM.get_neuron_config(source, instance_type="cpu", **SHAPE)
    model = Gemma3NeuronModelForCausalLM.export(source, config)
    return model, greedy(model)


def greedy(model: Gemma3NeuronModelForCausalLM) -> torch.Tensor:
    ids, mask = left_padded_batch(520)  # prompts of 5, 23 and 14 tokens
    return model.generate(ids, mask, max_new_tokens=NEW_TOKENS)


def artifact_bytes(model: Gemma3NeuronModelForCausalLM) -> dict[str, bytes]:
    """Every file of the model's artifact folder, to seed LocalHub repos directly."""
    folder = model.runtime.folder
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def cached_repo(repo_id: str) -> Path:
    return Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"


def test_push_then_load_through_the_hf_cache(exported, local_hub: LocalHub, tmp_path: Path):
    model, expected = exported
    repo_id, token = "testuser/tiny-gemma3", local_hub.token
    url = model.push_to_hub(tmp_path / "push", repo_id, private=True, token=token)

    api = HfApi(token=token)
    info = api.model_info(repo_id)
    assert info.private is True
    assert url == f"{local_hub.endpoint}/{repo_id}/commit/{info.sha}"
    files = set(list_repo_files(repo_id, token=token))
    assert ARTIFACT_FILES | {"README.md", ".gitattributes"} == files
    assert (tmp_path / "push" / "README.md").is_file()  # the pushed folder holds the card too
    # Rewritten by rename, the card and manifest get a new file's permissions, not private.
    (tmp_path / "push" / "probe").write_text("")
    modes = {name: oct((tmp_path / "push" / name).stat().st_mode) for name in CARD_AND_PROBE}
    assert len(set(modes.values())) == 1, modes

    card = ModelCard.load(repo_id, token=token)
    assert card.data.library_name == "optimum-neuron"
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["optimum-neuron", "optimum-gemma3", "gemma3", "neuron", "cpu"]
    assert card.data.base_model is None  # exported from a local folder, not a Hub id
    assert "import optimum_gemma3" in card.text
    assert f'NeuronModelForCausalLM.from_pretrained("{repo_id}")' in card.text
    assert "| batch_size | `3` |" in card.text
    assert "| context_encoding_buckets (prefill lengths) | `[16, 32]` |" in card.text
    assert f"| torch | `{torch.__version__}` |" in card.text

    # Private: an anonymous load is refused with the way out. (Only while nothing is cached:
    # like transformers, huggingface_hub serves a cached snapshot when the Hub says no.)
    with pytest.raises(RepositoryNotFoundError, match="is private.*hf auth login"):
        Gemma3NeuronModelForCausalLM.from_pretrained(repo_id)

    # Our class: downloaded into the fixture's HF cache, loads without compiling.
    loaded = Gemma3NeuronModelForCausalLM.from_pretrained(repo_id, token=token)
    snapshot = cached_repo(repo_id) / "snapshots" / info.sha
    assert cached_repo(repo_id).is_relative_to(tmp_path / "hf_home" / "hub")
    assert loaded.runtime.folder == snapshot
    assert ARTIFACT_FILES <= {
        p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
    }
    assert torch.equal(greedy(loaded), expected)

    # optimum-neuron's auto class finds our class through the registry.
    from optimum.neuron import NeuronModelForCausalLM

    auto = NeuronModelForCausalLM.from_pretrained(repo_id, token=token)
    assert isinstance(auto, Gemma3NeuronModelForCausalLM)
    assert auto.runtime.folder == snapshot
    assert torch.equal(greedy(auto), expected)

    with pytest.raises(RepositoryNotFoundError, match="does not exist or is private") as error:
        Gemma3NeuronModelForCausalLM.from_pretrained(repo_id + "-typo", token=token)
    assert isinstance(error.value.__cause__, RepositoryNotFoundError)
    assert "A token was sent" in str(error.value)
    assert local_hub.unhandled == []


def test_offline_loads_from_cache_and_explains_a_miss(
    exported, local_hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    model, expected = exported
    repo_id = "testuser/offline"
    model.push_to_hub(tmp_path / "push", repo_id, token=local_hub.token)
    Gemma3NeuronModelForCausalLM.from_pretrained(repo_id)  # public: no token needed

    # What HF_HUB_OFFLINE=1 at start-up does: the constant, and sessions that refuse requests.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    reset_sessions()
    requests_before = len(local_hub.log)
    assert torch.equal(greedy(Gemma3NeuronModelForCausalLM.from_pretrained(repo_id)), expected)
    assert local_hub.log[requests_before:] == []  # nothing asked of the Hub
    with pytest.raises(LocalEntryNotFoundError, match="HF_HUB_OFFLINE=1") as error:
        Gemma3NeuronModelForCausalLM.from_pretrained("testuser/never-downloaded")
    assert "not in the Hugging Face cache" in str(error.value)
    assert error.value.__cause__ is not None


def test_unreachable_hub_is_explained(local_hub: LocalHub, monkeypatch: pytest.MonkeyPatch):
    from huggingface_hub.utils import _http

    # huggingface_hub retries refused connections with backoff (20 s of sleeping): skip it.
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda seconds: None))
    local_hub.stop()
    with pytest.raises(LocalEntryNotFoundError, match="could not be reached"):
        Gemma3NeuronModelForCausalLM.from_pretrained("testuser/anything")


def test_push_to_a_branch_and_load_it(exported, local_hub: LocalHub, tmp_path: Path):
    model, expected = exported
    repo_id, token = "testuser/branched", local_hub.token
    url = model.push_to_hub(tmp_path / "push", repo_id, revision="v1", token=token)
    sha = HfApi(token=token).model_info(repo_id, revision="v1").sha
    assert url.endswith(f"/commit/{sha}")
    assert list_repo_files(repo_id) == [".gitattributes"]  # main untouched

    loaded = Gemma3NeuronModelForCausalLM.from_pretrained(repo_id, revision="v1")
    assert torch.equal(greedy(loaded), expected)
    card = ModelCard.load(hf_hub_download(repo_id, "README.md", revision="v1"))
    assert f'from_pretrained("{repo_id}", revision="v1")' in card.text

    with pytest.raises(RevisionNotFoundError, match="Revision 'v2' does not exist") as error:
        Gemma3NeuronModelForCausalLM.from_pretrained(repo_id, revision="v2")
    assert isinstance(error.value.__cause__, RevisionNotFoundError)
    # main holds no compiled model: the checkpoint advice, naming no revision.
    with pytest.raises(ArtifactError, match="has no neuron_config.json"):
        Gemma3NeuronModelForCausalLM.from_pretrained(repo_id)
    assert local_hub.unhandled == []


def test_push_replaces_stale_artifacts_and_reuses_a_saved_folder(
    exported, local_hub: LocalHub, tmp_path: Path
):
    model, _ = exported
    stale = {"compiled/prefill_999.pt2": b"old program", "LICENSE": b"kept"}
    local_hub.create_repo(f"{local_hub.user}/tiny", files=stale)
    folder = model.save_pretrained(tmp_path / "saved")
    weights_inode = (folder / "model.safetensors").stat().st_ino
    (folder / "notes.txt").write_text("the user's, never uploaded")

    # A bare name lands in the token owner's namespace.
    url = model.push_to_hub(folder, "tiny", token=local_hub.token)
    assert url.startswith(f"{local_hub.endpoint}/testuser/tiny/commit/")
    assert (folder / "model.safetensors").stat().st_ino == weights_inode  # not re-copied
    files = set(list_repo_files("testuser/tiny"))
    assert "compiled/prefill_999.pt2" not in files and "notes.txt" not in files
    assert (folder / "notes.txt").is_file()
    assert {"LICENSE", "README.md"} | ARTIFACT_FILES <= files
    assert local_hub.unhandled == []


def test_a_users_readme_in_the_push_folder_is_refused_before_saving(
    exported, local_hub: LocalHub, tmp_path: Path
):
    """Pushing writes the model card there: a README.md this project did not write stops
    the push before the model is saved beside it."""
    model, _ = exported
    folder = tmp_path / "push"
    folder.mkdir()
    (folder / "README.md").write_text("my own notes")
    with pytest.raises(ArtifactError, match="README.md"):
        model.push_to_hub(folder, "testuser/refused", token=local_hub.token)
    assert [path.name for path in folder.iterdir()] == ["README.md"]
    assert (folder / "README.md").read_text() == "my own notes"


def test_push_without_a_stored_token_says_log_in(exported, local_hub: LocalHub, tmp_path):
    model, _ = exported
    with pytest.raises(LocalTokenNotFoundError, match="hf auth login"):
        model.push_to_hub(tmp_path / "push", "testuser/no-token")  # token=True by default


def test_gated_repo_says_request_access(exported, local_hub: LocalHub):
    model, expected = exported
    repo_id = "google/gated-gemma3"  # gates do not apply to the namespace's own members
    local_hub.create_repo(repo_id, gated="auto", files=artifact_bytes(model))
    for token in (None, local_hub.token):
        with pytest.raises(GatedRepoError, match="is gated: request access") as error:
            Gemma3NeuronModelForCausalLM.from_pretrained(repo_id, token=token)
        assert f"{local_hub.endpoint}/{repo_id}" in str(error.value)
        assert isinstance(error.value.__cause__, GatedRepoError)

    local_hub.grant_access(repo_id, local_hub.user)
    loaded = Gemma3NeuronModelForCausalLM.from_pretrained(repo_id, token=local_hub.token)
    assert torch.equal(greedy(loaded), expected)
    assert local_hub.unhandled == []


def test_checkpoint_repo_suggests_export_before_downloading_weights(local_hub: LocalHub):
    config = {"model_type": "gemma3_text", "hidden_size": 64}
    weights = b"\0" * 4096
    repo = local_hub.create_repo(
        "testuser/checkpoint",
        files={"config.json": json.dumps(config).encode(), "model.safetensors": weights},
    )
    with pytest.raises(ArtifactError, match="export=True") as error:
        Gemma3NeuronModelForCausalLM.from_pretrained(repo.repo_id)
    assert "no neuron_config.json" in str(error.value)
    assert not any(p.name == "model.safetensors" for p in cached_repo(repo.repo_id).rglob("*"))


def test_other_versions_are_refused_before_downloading_programs(exported, local_hub: LocalHub):
    model, _ = exported
    files = artifact_bytes(model)
    recorded = json.loads(files["neuron_config.json"])
    files["neuron_config.json"] = json.dumps({**recorded, "torch_version": "1.0.0"}).encode()
    repo = local_hub.create_repo("testuser/old-torch", files=files)
    with pytest.raises(ArtifactError, match="torch_version='1.0.0'") as error:
        Gemma3NeuronModelForCausalLM.from_pretrained(repo.repo_id)
    assert "Hub repo 'testuser/old-torch' cannot be loaded here" in str(error.value)
    downloaded = {p.name for p in cached_repo(repo.repo_id).rglob("*") if p.is_file()}
    assert "model.safetensors" not in downloaded
    assert not [name for name in downloaded if name.endswith(".pt2")]


def test_neither_folder_nor_repo_id(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub repo id"):
        Gemma3NeuronModelForCausalLM.from_pretrained(tmp_path / "missing")


def test_model_card_names_a_hub_base_model(exported, tmp_path, monkeypatch):
    model, _ = exported
    neuron_config = Gemma3NeuronModelForCausalLM.get_neuron_config(
        model.runtime.folder, config=model.config, instance_type="cpu", **SHAPE
    )
    neuron_config.checkpoint_id = "google/gemma-3-4b-it"
    card = model_card(neuron_config, "me/gemma-3-4b-it-neuron", has_tokenizer=False)
    assert card.data.base_model == "google/gemma-3-4b-it"
    assert 'AutoTokenizer.from_pretrained("google/gemma-3-4b-it")' in card.text

    assert hub_repo_id("google/gemma-3-4b-it") == "google/gemma-3-4b-it"
    for local in ("/abs/path", "./rel/path", "~/x/y", "path/to/folder", "no-namespace", None):
        assert hub_repo_id(local) is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "gemma").mkdir(parents=True)
    assert hub_repo_id("local/gemma") is None  # an existing folder is a path
