"""TEST INFRASTRUCTURE: a loopback stand-in for the Hugging Face Hub HTTP API.

The real Hub is unreachable from CI, yet push_to_hub / from_pretrained("user/repo") must be tested
end to end. LocalHub serves, on 127.0.0.1 only, exactly the routes huggingface_hub 0.36 calls for
create_repo, create_branch, upload_folder/create_commit, model_info, list_repo_files,
hf_hub_download and snapshot_download (plus what transformers' push_to_hub adds). Any other route
answers 501 and is printed to stderr, so a test that drifts onto unimplemented API fails loudly.

Deliberate simplifications, each invisible to the client:
- preupload answers uploadMode "regular" for every file, so LFS and Xet are never negotiated and
  file bytes travel base64-encoded inside the ndjson commit payload;
- a commit id is the sha1 of the commit's content (parent, message, files, position), not git's;
- a repository belongs to its namespace: the user of that name, or members of an org in `orgs`.
Errors carry the status, X-Error-Code and X-Error-Message that hf_raise_for_status turns into
RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError and EntryNotFoundError. The code
is always sent explicitly: the client's bare-401 -> RepositoryNotFoundError rule matches https only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

DEFAULT_TOKEN = "hf_test_token"
DEFAULT_USER = "testuser"
API_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# The Hub seeds every new repo with an "initial commit" holding .gitattributes; so do we.
GITATTRIBUTES = b"*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs -text\n"

Response = tuple[int, dict[str, str], bytes]
UNSET_ENV = "HF_TOKEN HUGGING_FACE_HUB_TOKEN HF_TOKEN_PATH HUGGINGFACE_HUB_CACHE HF_ASSETS_CACHE \
TRANSFORMERS_CACHE HF_HUB_ENABLE_HF_TRANSFER"
HUB_CACHE_CONSTANTS = "HF_HUB_CACHE HUGGINGFACE_HUB_CACHE default_cache_path TRANSFORMERS_CACHE \
PYTORCH_TRANSFORMERS_CACHE PYTORCH_PRETRAINED_BERT_CACHE"


class HubError(Exception):
    """An error answered the way the Hub does: status, X-Error-Code, X-Error-Message, JSON body."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers: dict[str, str] = extra.pop("headers", {})
        self.extra = extra

    def response(self) -> Response:
        headers = {"X-Error-Message": self.message, **self.headers}
        if self.code:
            headers["X-Error-Code"] = self.code
        return _json(self.status, {"error": self.message, **self.extra}, headers)


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> Response:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


def git_blob_oid(data: bytes) -> str:
    """Git's blob id: what the Hub reports as a regular file's ETag and preupload `oid`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, str]  # path in repo -> blob oid
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool | str = False  # False, "auto" or "manual", as model_info reports it
    granted: set[str] = field(default_factory=set)  # users allowed through the gate
    commits: list[Commit] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    created: str = field(default_factory=_now)

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit:
        sha = self.branches.get(revision, revision)
        for commit in self.commits:
            if commit.sha == sha:
                return commit
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class LocalHub:
    """Repos on disk under `root` (blobs/ by git oid, repos/ as JSON), served over loopback HTTP."""

    def __init__(
        self,
        root: str | Path | None = None,
        tokens: dict[str, str] | None = None,
        orgs: dict[str, set[str]] | None = None,
    ) -> None:
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="local-hub-"))
        self.tokens = dict(tokens) if tokens is not None else {DEFAULT_TOKEN: DEFAULT_USER}
        self.orgs = orgs or {}
        self.repos: dict[tuple[str, str], Repo] = {}
        self.log: list[str] = []  # "METHOD /path" of every request, to assert on routes used
        self.unhandled: list[str] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> LocalHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "LocalHub is not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token(self) -> str:
        return next(iter(self.tokens))

    @property
    def user(self) -> str:
        return self.tokens[self.token]

    # -- state, also usable directly by tests to seed repos ----------------------------------
    def create_repo(
        self,
        repo_id: str,
        *,
        repo_type: str = "model",
        private: bool = False,
        gated: bool | str = False,
        files: dict[str, bytes] | None = None,
    ) -> Repo:
        """Create a repo (with the Hub's initial .gitattributes commit), optionally seeded."""
        with self._lock:
            repo = Repo(repo_type, repo_id, private=private, gated=gated)
            self.repos[(repo_type, repo_id)] = repo
            self.commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES})
            if files:
                self.commit(repo, "main", "Seed files", files)
            return repo

    def grant_access(self, repo_id: str, user: str, repo_type: str = "model") -> None:
        self.repos[(repo_type, repo_id)].granted.add(user)

    def commit(
        self,
        repo: Repo,
        branch: str,
        message: str,
        additions: dict[str, bytes],
        deletions: list[tuple[str, bool]] | None = None,
    ) -> Commit:
        """Apply (path, is_folder) deletions then additions on top of `branch`, moving it."""
        with self._lock:
            parent = repo.branches.get(branch)
            files = dict(repo.resolve(parent).files) if parent else {}
            for path, is_folder in deletions or []:
                doomed = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                doomed = doomed if is_folder else [path] if path in files else []
                if not doomed:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                for p in doomed:
                    del files[p]
            for path, data in additions.items():
                files[path] = oid = git_blob_oid(data)
                blob = self.root / "blobs" / oid
                if not blob.exists():
                    blob.parent.mkdir(parents=True, exist_ok=True)
                    blob.write_bytes(data)
            content = json.dumps([parent, message, sorted(files.items()), len(repo.commits)])
            sha = hashlib.sha1(content.encode()).hexdigest()
            commit = Commit(sha, parent, message, files, _now())
            repo.commits.append(commit)
            repo.branches[branch] = commit.sha
            self._save(repo)
            return commit

    def _save(self, repo: Repo) -> None:
        path = self.root / "repos" / repo.repo_type / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v for k, v in vars(repo).items() if k not in ("commits", "granted")}
        state["commits"] = [vars(c) for c in repo.commits]
        state["granted"] = sorted(repo.granted)
        path.write_text(json.dumps(state, indent=1))

    def _blob(self, oid: str) -> Path:
        return self.root / "blobs" / oid

    # -- access rules ------------------------------------------------------------------------
    def _authenticate(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        user = self.tokens.get(authorization.removeprefix("Bearer ").strip())
        if user is None:  # what the Hub says for a bad token, on any route
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _member(self, user: str | None, namespace: str) -> bool:
        return user is not None and (user == namespace or user in self.orgs.get(namespace, ()))

    def _readable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not self._member(user, repo.namespace)):
            # Missing and hidden look the same: 401 when anonymous, 404 when logged in.
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        return repo

    def _writable(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        repo = self._readable(repo_type, repo_id, user)
        if user is None:  # the Hub's bare 401, which the client reports as RepositoryNotFound
            raise HubError(401, "Repository not found", "RepoNotFound")
        if not self._member(user, repo.namespace):
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    def _check_gate(self, repo: Repo, user: str | None) -> None:
        if not repo.gated or self._member(user, repo.namespace) or user in repo.granted:
            return
        what = f"Access to {repo.repo_type} {repo.repo_id} is restricted"
        if user is None:
            msg = f"{what}. You must have access to it and be authenticated to access it."
            raise HubError(401, msg + " Please log in.", "GatedRepo")
        msg = f"{what} and you are not in the authorized list. Visit {self.endpoint}/{repo.repo_id}"
        raise HubError(403, msg + " to ask for access.", "GatedRepo")

    # -- routing -----------------------------------------------------------------------------
    def handle(
        self, method: str, path: str, query: dict[str, str], headers: Message, body: bytes
    ) -> Response:
        """Answer one request; called by the HTTP handler under the hub lock."""
        self.log.append(f"{method} {path}")
        try:
            user = self._authenticate(headers.get("Authorization"))
            segs = [unquote(s) for s in path.strip("/").split("/")]
            match method, segs:
                case "GET", ["api", "whoami-v2"]:
                    return self._whoami(user)
                case "POST", ["api", "repos", "create"]:
                    return self._create(user, json.loads(body))
                case "DELETE", ["api", "repos", "delete"]:
                    return self._delete(user, json.loads(body))
                case "POST", ["api", "validate-yaml"]:  # README.md metadata is not checked here
                    return _json(200, {"errors": [], "warnings": []})
                case _, ["api", kind, ns, name, *rest] if kind in API_KINDS:
                    if _truthy(query.get("create_pr")):
                        raise HubError(501, "LocalHub does not implement create_pr")
                    repo_args = (API_KINDS[kind], f"{ns}/{name}", user)
                    if answer := self._repo_api(method, repo_args, rest, query, body):
                        return answer
                case "GET" | "HEAD", [*_] if "resolve" in segs[1:]:
                    return self._resolve(segs, user)
            self.unhandled.append(f"{method} {path}")
            print(f"LocalHub: UNHANDLED ROUTE {method} {path}", file=sys.stderr)
            raise HubError(501, f"LocalHub does not implement {method} {path}")
        except HubError as error:
            return error.response()

    def _repo_api(
        self,
        method: str,
        repo_args: tuple[str, str, str | None],
        rest: list[str],
        query: dict[str, str],
        body: bytes,
    ) -> Response | None:
        """The /api/{models,datasets,spaces}/{namespace}/{name}/... routes; None if unknown."""
        match method, rest:
            case "GET", [] | ["revision", _]:
                repo = self._readable(*repo_args)
                return self._info(repo, rest[1] if rest else "main", _truthy(query.get("blobs")))
            case "GET", ["tree", revision, *sub]:
                commit = self._readable(*repo_args).resolve(revision)
                recursive = _truthy(query.get("recursive"))
                return _json(200, self._tree(commit, "/".join(sub), recursive))
            case "POST", ["preupload", revision]:
                commit = self._writable(*repo_args).resolve(revision)
                files = [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": commit.files.get(f["path"]),
                    }
                    for f in json.loads(body)["files"]
                ]
                return _json(200, {"files": files, "commitOid": commit.sha})
            case "POST", ["commit", revision]:
                return self._commit(self._writable(*repo_args), revision, body)
            case "POST", ["branch", branch]:
                repo = self._writable(*repo_args)
                if branch in repo.branches:
                    raise HubError(409, "Reference already exists")
                start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
                repo.branches[branch] = repo.resolve(start).sha
                self._save(repo)
                return _json(200, {})
        return None

    # -- handlers ----------------------------------------------------------------------------
    def _whoami(self, user: str | None) -> Response:
        if user is None:
            raise HubError(401, "Invalid username or password.")
        orgs = [{"type": "org", "name": org} for org, users in self.orgs.items() if user in users]
        auth = {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}
        return _json(200, {"type": "user", "name": user, "orgs": orgs, "auth": auth})

    def _create(self, user: str | None, payload: dict[str, Any]) -> Response:
        if user is None:
            raise HubError(401, "You must be authenticated to create a repository")
        repo_type = payload.get("type") or "model"
        namespace = payload.get("organization") or user
        if not self._member(user, namespace):
            raise HubError(403, f"You don't have the rights to create a repo under {namespace}")
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self.repos:  # create_repo(exist_ok=True) reads `url` from it
            raise HubError(409, f"You already created this {repo_type} repo", url=url)
        self.create_repo(repo_id, repo_type=repo_type, private=bool(payload.get("private")))
        return _json(200, {"url": url, "name": repo_id})

    def _delete(self, user: str | None, payload: dict[str, Any]) -> Response:
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or user}/{payload['name']}"
        repo = self._writable(repo_type, repo_id, user)
        del self.repos[(repo_type, repo.repo_id)]
        (self.root / "repos" / repo_type / f"{repo.repo_id}.json").unlink()
        return _json(200, {})

    def _info(self, repo: Repo, revision: str, blobs: bool) -> Response:
        """model_info: snapshot_download needs `sha` and `siblings`; the rest is for callers."""
        commit = repo.resolve(revision)
        siblings = []
        for path, oid in sorted(commit.files.items()):
            extra = {"size": self._blob(oid).stat().st_size, "blobId": oid} if blobs else {}
            siblings.append({"rfilename": path, **extra})
        info = {
            "id": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": repo.gated,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        return _json(200, info)

    def _tree(self, commit: Commit, sub: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = f"{sub.strip('/')}/" if sub else ""
        entries: dict[str, dict[str, Any]] = {}
        for path, oid in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                folder = prefix + "/".join(parts[:depth])
                oid_dir = hashlib.sha1(folder.encode()).hexdigest()
                entries[folder] = {"type": "directory", "oid": oid_dir, "size": 0, "path": folder}
            if recursive or len(parts) == 1:
                size = self._blob(oid).stat().st_size
                entries[path] = {"type": "file", "oid": oid, "size": size, "path": path}
        if prefix and not entries:
            raise HubError(404, "Entry not found", "EntryNotFound")
        return [entries[p] for p in sorted(entries)]

    def _commit(self, repo: Repo, revision: str, body: bytes) -> Response:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        if revision not in repo.branches:  # commits go to existing branches only
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        if header.get("parentCommit") not in (None, repo.branches[revision]):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        additions: dict[str, bytes] = {}
        deletions: list[tuple[str, bool]] = []
        for op in lines[1:]:
            key, value = op["key"], op["value"]
            if key == "file":
                raw = value["content"]
                base64_encoded = value.get("encoding") == "base64"
                additions[value["path"]] = base64.b64decode(raw) if base64_encoded else raw.encode()
            elif key in ("deletedFile", "deletedFolder"):
                deletions.append((value["path"], key == "deletedFolder"))
            else:  # lfsFile needs an LFS upload, which preupload never asks for
                raise HubError(501, f"LocalHub does not implement commit operation {key!r}")
        commit = self.commit(repo, revision, header["summary"], additions, deletions)
        url = f"{self.endpoint}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{commit.sha}"
        return _json(200, {"success": True, "commitOid": commit.sha, "commitUrl": url})

    def _resolve(self, segs: list[str], user: str | None) -> Response:
        """GET/HEAD /[datasets/]{repo_id}/resolve/{revision}/{filename}: the file download route."""
        repo_type = {"datasets": "dataset", "spaces": "space"}.get(segs[0], "model")
        segs = segs[1:] if repo_type != "model" else segs
        at = segs.index("resolve")
        repo = self._readable(repo_type, "/".join(segs[:at]), user)
        self._check_gate(repo, user)
        commit = repo.resolve(segs[at + 1])
        oid = commit.files.get("/".join(segs[at + 2 :]))
        if oid is None:  # X-Repo-Commit lets the client cache the miss under .no_exist/
            sha = {"X-Repo-Commit": commit.sha}
            raise HubError(404, "Entry not found", "EntryNotFound", headers=sha)
        data = self._blob(oid).read_bytes()
        # No Range support: a resumed download gets 200 and the client restarts from zero.
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{oid}"'}
        return 200, {**headers, "Content-Type": "application/octet-stream"}, data


class _Handler(BaseHTTPRequestHandler):
    """HTTP plumbing only: read the request, let LocalHub.handle answer it, write the answer."""

    protocol_version = "HTTP/1.1"  # keep-alive, as requests expects; every answer has a length
    hub: LocalHub

    def _serve(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        # requests sends bytes/json bodies with a Content-Length, never chunked.
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            with self.hub._lock:
                status, headers, payload = self.hub.handle(
                    self.command, url.path, query, self.headers, body
                )
        except Exception as error:  # a LocalHub bug: say so instead of hanging the client
            print(f"LocalHub: crashed on {self.command} {self.path}: {error!r}", file=sys.stderr)
            status, headers, payload = HubError(500, f"LocalHub crashed: {error!r}").response()
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        """Silence per-request stderr lines; LocalHub.log keeps them instead."""


def _patch_clients(mp: pytest.MonkeyPatch, endpoint: str, hf_home: Path) -> None:
    """Point huggingface_hub, transformers and optimum at `endpoint`, online, with a fresh cache.

    Those libraries copy env vars into module constants at import time (often re-imported by
    name elsewhere), so every module-level copy is patched, and env vars are set for subprocesses.
    """
    from huggingface_hub import hf_api

    with suppress(ImportError):  # imported now, its constants would keep patched values after
        import transformers.utils.hub  # noqa: F401

    hub_cache, loopback = str(hf_home / "hub"), "127.0.0.1,localhost"
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(hf_home), "HF_HUB_CACHE": hub_cache,
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
           "NO_PROXY": loopback, "no_proxy": loopback}  # fmt: skip
    for key, value in env.items():
        mp.setenv(key, value)
    for key in UNSET_ENV.split():
        mp.delenv(key, raising=False)
    constants: dict[str, object] = {
        **dict.fromkeys(("ENDPOINT", "HUGGINGFACE_CO_RESOLVE_ENDPOINT"), endpoint),
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HUGGINGFACE_CO_PREFIX": endpoint + "/{model_id}/resolve/{revision}/{filename}",
        "HUGGINGFACE_CO_EXAMPLES_TELEMETRY": endpoint + "/api/telemetry/examples",
        **dict.fromkeys(HUB_CACHE_CONSTANTS.split(), hub_cache),
        **dict.fromkeys(("HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE"), str(hf_home / "assets")),
        "HF_HOME": str(hf_home),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_MODULES_CACHE": str(hf_home / "modules"),
        "HF_TOKEN_PATH": str(hf_home / "token"),
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        # transformers.utils.hub keeps its own `_is_offline_mode`, behind is_offline_mode()
        **dict.fromkeys(("HF_HUB_OFFLINE", "_is_offline_mode", "HF_HUB_ENABLE_HF_TRANSFER"), False),
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    prefixes = ("huggingface_hub", "transformers", "optimum")
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(prefixes):
            continue
        namespace = getattr(module, "__dict__", {})
        for key, value in constants.items():
            if key in namespace and type(namespace[key]) is type(value):
                mp.setattr(module, key, value)
    mp.setattr(hf_api.api, "endpoint", endpoint)  # the HfApi behind huggingface_hub.upload_folder


@contextmanager
def serve_local_hub(workdir: Path) -> Iterator[LocalHub]:
    """Run a LocalHub with huggingface_hub/transformers online and pointed at it, then restore.

    HF_HOME (cache, token file) lives in `workdir`; no token is implied: pass `token=hub.token`
    or set HF_TOKEN yourself. On exit every constant, env var and offline mode is put back.
    """
    from huggingface_hub.utils import reset_sessions

    with LocalHub(workdir / "local_hub") as hub, pytest.MonkeyPatch.context() as mp:
        _patch_clients(mp, hub.endpoint, workdir / "hf_home")
        reset_sessions()  # sessions made while offline carry an adapter that refuses requests
        try:
            yield hub
        finally:
            mp.undo()
            reset_sessions()


@pytest.fixture
def local_hub(tmp_path: Path) -> Iterator[LocalHub]:
    """A fresh LocalHub per test; see serve_local_hub."""
    with serve_local_hub(tmp_path) as hub:
        yield hub
