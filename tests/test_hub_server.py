"""Runs against a local loopback server (tests/hub_server.py), not the real Hub.

Proves that the real huggingface_hub / transformers client functions work end to end against
LocalHub, so product tests can rely on it for push_to_hub / from_pretrained("user/repo").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from huggingface_hub import (
    HfApi,
    constants,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

if TYPE_CHECKING:
    from tests.hub_server import LocalHub

# The `local_hub` fixture comes from tests/hub_server.py, registered in tests/conftest.py.
CONFIG = {"model_type": "gemma3_text", "hidden_size": 8}
WEIGHTS = os.urandom(5 * 1024 * 1024)  # 5 MB *.safetensors: the real Hub would route it to LFS


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any attempt, in this process, to open a TCP connection off the loopback interface."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: tuple[str, int]) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            assert address[0] in ("127.0.0.1", "::1"), f"non-loopback connection to {address}"
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


def _folder(root: Path, config: dict[str, object] = CONFIG) -> Path:
    """A checkpoint-like folder: a JSON file, a 5 MB binary and a nested file."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config))
    (root / "model.safetensors").write_bytes(WEIGHTS)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / "nested" / "deeper" / "notes.txt").write_text("hello")
    return root


def _pushed(hub: LocalHub, tmp_path: Path, name: str = "model", **create: bool) -> str:
    """Create `testuser/{name}` through the client and upload _folder() to main."""
    api = HfApi(token=hub.token)
    repo_id = api.create_repo(name, **create).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=_folder(tmp_path / name))
    return repo_id


def test_create_repo_public_and_private(local_hub: LocalHub) -> None:
    api = HfApi(token=local_hub.token)
    public = api.create_repo("public")
    private = api.create_repo("private", private=True)
    assert public.repo_id == "testuser/public"
    assert public.startswith(local_hub.endpoint)
    assert model_info("testuser/public", token=False).private is False
    assert api.model_info(private.repo_id).private is True
    with pytest.raises(RepositoryNotFoundError):  # private + anonymous looks missing
        model_info(private.repo_id, token=False)
    api.create_repo("public", exist_ok=True)  # 409 swallowed client-side
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("public")
    assert conflict.value.response.status_code == 409
    assert api.whoami()["name"] == "testuser"


def test_upload_folder_to_main_and_branch(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = _pushed(local_hub, tmp_path)
    expected = [".gitattributes", "config.json", "model.safetensors", "nested/deeper/notes.txt"]
    assert sorted(list_repo_files(repo_id)) == expected

    api = HfApi(token=local_hub.token)
    with pytest.raises(RevisionNotFoundError):  # the Hub wants the branch to exist first
        api.upload_folder(repo_id=repo_id, folder_path=tmp_path / "model", revision="v1")
    api.create_branch(repo_id, branch="v1")
    api.create_branch(repo_id, branch="v1", exist_ok=True)
    v1 = _folder(tmp_path / "v1", {**CONFIG, "hidden_size": 16})
    (v1 / "model.safetensors").unlink()
    info = api.upload_folder(repo_id=repo_id, folder_path=v1, revision="v1")
    assert info.oid == api.model_info(repo_id, revision="v1").sha != api.model_info(repo_id).sha
    assert sorted(list_repo_files(repo_id, revision="v1")) == expected  # model.safetensors kept

    # Unchanged files are skipped client-side thanks to preupload's `oid`: only config.json moved.
    commits = [line for line in local_hub.log if line.startswith("POST /api/models/")]
    assert commits == [f"POST /api/models/{repo_id}/{step}" for step in (
        "preupload/main", "commit/main", "preupload/v1", "branch/v1", "branch/v1",
        "preupload/v1", "commit/v1",
    )]  # fmt: skip
    assert local_hub.unhandled == []
    assert not any("lfs" in line or "xet" in line for line in local_hub.log)


def test_downloads_land_in_hf_cache(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = _pushed(local_hub, tmp_path)
    sha = model_info(repo_id).sha
    hub_cache = Path(constants.HF_HUB_CACHE)
    assert hub_cache == tmp_path / "hf_home" / "hub"

    snapshot = Path(snapshot_download(repo_id))
    assert snapshot == hub_cache / "models--testuser--model" / "snapshots" / sha
    assert (snapshot / "model.safetensors").read_bytes() == WEIGHTS
    assert (snapshot / "nested" / "deeper" / "notes.txt").read_text() == "hello"
    assert (hub_cache / "models--testuser--model" / "refs" / "main").read_text() == sha

    config = Path(hf_hub_download(repo_id, "config.json"))
    assert config == snapshot / "config.json" and config.is_symlink()
    assert json.loads(config.read_text()) == CONFIG
    blob_names = {p.name for p in (hub_cache / "models--testuser--model" / "blobs").iterdir()}
    assert config.resolve().name in blob_names  # blobs are named by the quoted ETag

    info = model_info(repo_id, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings}
    assert sizes["model.safetensors"] == len(WEIGHTS)
    assert local_hub.unhandled == []


def test_error_classes(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = _pushed(local_hub, tmp_path)
    with pytest.raises(RepositoryNotFoundError):
        model_info("testuser/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("testuser/missing", "config.json")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        model_info(repo_id, revision="nope")
    with pytest.raises(HfHubHTTPError) as bad_token:  # a bad token is not "repo not found"
        model_info(repo_id, token="hf_wrong")
    assert bad_token.value.response.status_code == 401
    assert not isinstance(bad_token.value, RepositoryNotFoundError)


def test_private_repo_needs_token(local_hub: LocalHub, tmp_path: Path) -> None:
    repo_id = _pushed(local_hub, tmp_path, "secret", private=True)
    for call in (
        lambda: hf_hub_download(repo_id, "config.json"),
        lambda: snapshot_download(repo_id),
        lambda: list_repo_files(repo_id),
    ):
        with pytest.raises(RepositoryNotFoundError):
            call()
    assert hf_hub_download(repo_id, "config.json", token=local_hub.token)


def test_gated_repo(local_hub: LocalHub) -> None:
    local_hub.tokens["hf_other"] = "other"
    repo = local_hub.create_repo("testuser/gated", gated="auto", files={"config.json": b"{}"})
    assert model_info(repo.repo_id).gated == "auto"  # metadata stays public
    for token in (None, "hf_other"):
        with pytest.raises(GatedRepoError):
            hf_hub_download(repo.repo_id, "config.json", token=token)
    local_hub.grant_access(repo.repo_id, "other")
    assert hf_hub_download(repo.repo_id, "config.json", token="hf_other")


def test_transformers_push_and_from_pretrained(local_hub: LocalHub, tmp_path: Path) -> None:
    from transformers import AutoConfig, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, num_hidden_layers=1)
    config.push_to_hub("testuser/tiny", token=local_hub.token)
    config.push_to_hub("testuser/tiny", token=local_hub.token, revision="v2")
    loaded = AutoConfig.from_pretrained("testuser/tiny")
    assert isinstance(loaded, Gemma3TextConfig) and loaded.hidden_size == 64
    assert local_hub.unhandled == []


def test_subprocess_sees_local_hub(local_hub: LocalHub) -> None:
    local_hub.create_repo("testuser/sub", files={"a": b'{"a": 1}'})
    code = "import huggingface_hub as h; print(open(h.hf_hub_download('testuser/sub', 'a')).read())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == {"a": 1}


def test_serve_local_hub_restores_everything(tmp_path: Path) -> None:
    import transformers.utils.hub as transformers_hub

    from tests.hub_server import serve_local_hub

    before = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE,
              transformers_hub.is_offline_mode(), os.environ.get("HF_ENDPOINT"))  # fmt: skip
    with serve_local_hub(tmp_path) as hub:
        assert constants.ENDPOINT == hub.endpoint
        assert constants.HF_HUB_OFFLINE is False and transformers_hub.is_offline_mode() is False
        assert os.environ["HF_HUB_OFFLINE"] == "0"
    after = (constants.ENDPOINT, constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE,
             transformers_hub.is_offline_mode(), os.environ.get("HF_ENDPOINT"))  # fmt: skip
    assert after == before
