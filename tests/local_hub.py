"""A Hugging Face Hub on localhost for the tests: repos are folders on disk, served over real HTTP to the unpatched
huggingface_hub, diffusers and transformers clients. It answers what those clients call to load a model repo (model
info, tree listing, paths-info, `resolve` with the Hub's headers and errors) and to push one (create repo, preupload,
NDJSON commit, branches), and keeps a log of what it served.

    hub = LocalHub(tmp_path).start()
    sha = hub.add_repo("someone/tiny", folder)  # the folder is copied: later edits do not change the repo
    hub.add_branch("someone/tiny", "fp16-only", other_folder)
    DiffusionPipeline.from_pretrained("someone/tiny", revision="fp16-only")  # with HF_ENDPOINT=hub.url
    assert hub.downloaded("someone/tiny") == [...]

huggingface_hub reads HF_ENDPOINT and HF_HOME once, on import: `start_session_hub` starts the server and sets them,
and must run before anything imports huggingface_hub (tests/conftest.py calls it first thing).

What it leaves out: Xet and the LFS upload protocol (preupload answers "regular" for every file, so contents come
inline in the commit), pull requests, tags, private repos hidden from others, repo types other than models.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

# Suffixes the Hub's default .gitattributes stores in LFS: served with the LFS headers (sha256 etag, linked size).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".model")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
USER = "local-user"  # whoami's name
REVOKED_TOKEN = "hf_revoked"  # answered as the Hub answers an expired or revoked token: 401 on every request


class Request(NamedTuple):
    """One request as the hub answered it; `sent` is (repo_id, file) when a GET sent that file's contents."""

    method: str
    path: str  # percent-decoded, without the query
    query: str
    status: int
    sent: tuple[str, str] | None = None


class HubError(Exception):
    """An error the way the Hub answers it: a status, `X-Error-Code`/`X-Error-Message` and a `{"error": ...}` body."""

    def __init__(self, status: int, code: str | None, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}

    def reply(self) -> _Reply:
        code = {"X-Error-Code": self.code} if self.code else {}
        return _json({"error": self.message}, self.status, {**self.headers, **code, "X-Error-Message": self.message})


class _Call(NamedTuple):
    """One request, as the routes read it."""

    method: str
    segments: list[str]  # the URL path split on "/", each part percent-decoded
    query: dict[str, list[str]]
    body: bytes
    token: str | None  # of `Authorization: Bearer <token>`; any token is accepted
    range: str | None

    def flag(self, name: str) -> bool:
        return self.query.get(name, ["false"])[0].lower() in ("1", "true")


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    sent: tuple[str, str] | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json(obj, status: int = 200, headers: dict[str, str] | None = None) -> _Reply:
    return _Reply(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})


@dataclass(frozen=True)
class _Entry:
    """A file as the Hub describes it: git blob id (sha1 of "blob <size>\\0" + bytes), and sha256 if in LFS."""

    size: int
    oid: str
    sha256: str | None

    @classmethod
    def of(cls, path: str, data: bytes) -> _Entry:
        oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = path.endswith(LFS_SUFFIXES)
        return cls(len(data), oid, hashlib.sha256(data).hexdigest() if lfs else None)

    def tree_json(self, path: str) -> dict:
        lfs = {"lfs": {"oid": self.sha256, "size": self.size, "pointerSize": 134}} if self.sha256 else {}
        return {"type": "file", "oid": self.oid, "size": self.size, "path": path, **lfs}


@dataclass(frozen=True)
class _Commit:
    sha: str
    folder: Path  # never written to once the commit exists
    files: dict[str, _Entry]
    title: str
    date: str


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, _Commit] = field(default_factory=dict)
    gated: bool = False
    accepted_tokens: frozenset[str] = frozenset()
    created: str = field(default_factory=_now)


def _commit_sha(repo_id: str, parent: str | None, files: dict[str, _Entry]) -> str:
    """Deterministic from content: the same files on the same parent give the same id (as git would, minus time)."""
    listing = json.dumps([repo_id, parent, sorted((path, entry.oid) for path, entry in files.items())])
    return hashlib.sha1(listing.encode()).hexdigest()


class LocalHub:
    """The Hub's HTTP API over folders under `root` (one folder per commit). Thread-safe; see the module docstring."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._repos: dict[str, _Repo] = {}
        self._log: list[Request] = []
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> LocalHub:
        """Serve on 127.0.0.1 on a free port, from a daemon thread."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self
        threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub.url: the hub is not running; call start() first")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- what the tests set up and read back -------------------------------------------------------------------------

    def add_repo(self, repo_id: str, folder: Path, revision: str = "main", gated: bool = False) -> str:
        """Create `repo_id` with a copy of `folder` as branch `revision`; returns its commit sha."""
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"add_repo: repo_id={repo_id!r} exists already; add_branch adds a revision to it")
            self._repos[repo_id] = _Repo(gated=gated)
            return self.add_branch(repo_id, revision, folder)

    def add_branch(self, repo_id: str, branch: str, folder: Path) -> str:
        """Point `branch` of `repo_id` at a new commit holding a copy of `folder`; returns its commit sha."""
        with self._lock:
            repo = self._existing(repo_id)
            files = {p.relative_to(folder).as_posix(): p for p in sorted(Path(folder).rglob("*")) if p.is_file()}
            if not files:
                raise ValueError(f"add_branch: folder={str(folder)!r} holds no files; the Hub has no empty commits")
            additions = {path: p.read_bytes() for path, p in files.items()}
            commit = self._commit(repo_id, None, additions, set(), f"Add {branch}")
            repo.refs[branch] = commit.sha
            return commit.sha

    def set_gated(self, repo_id: str, gated: bool, accepted_tokens: tuple[str, ...] = ()) -> None:
        """Gate the repo's files: 401 without a token, 403 with a token not in `accepted_tokens`."""
        with self._lock:
            repo = self._existing(repo_id)
            repo.gated, repo.accepted_tokens = gated, frozenset(accepted_tokens)

    def commit_sha(self, repo_id: str, revision: str = "main") -> str:
        """The commit a branch points at (what `model_info(...).sha` answers)."""
        with self._lock:
            return self._resolve(repo_id, revision).sha

    def repo_folder(self, repo_id: str, revision: str = "main") -> Path:
        """The files of `revision` (a branch or commit sha), e.g. to read what was pushed. Do not write to it."""
        with self._lock:
            return self._resolve(repo_id, revision).folder

    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._log)

    def downloaded(self, repo_id: str) -> list[str]:
        """Repo-relative paths whose contents a GET sent (HEAD and error replies not counted), in order."""
        return [r.sent[1] for r in self.requests if r.sent is not None and r.sent[0] == repo_id]

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    # -- state ---------------------------------------------------------------------------------------------------------

    def _existing(self, repo_id: str) -> _Repo:
        if repo_id not in self._repos:
            raise KeyError(f"LocalHub has no repo {repo_id!r}; add it with add_repo")
        return self._repos[repo_id]

    def _resolve(self, repo_id: str, revision: str) -> _Commit:
        repo = self._existing(repo_id)
        sha = repo.refs.get(revision, revision)
        if sha not in repo.commits:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo.commits[sha]

    def _commit(self, repo_id: str, parent: _Commit | None, additions: dict[str, bytes], deletions: set[str],
                title: str) -> _Commit:  # fmt: skip
        """A new commit: the parent's files, less `deletions`, plus `additions`. Unchanged files are hard links."""
        staging = self.root / ".staging" / uuid.uuid4().hex
        if parent is not None:
            shutil.copytree(parent.folder, staging, copy_function=os.link)
        staging.mkdir(parents=True, exist_ok=True)
        files = {path: entry for path, entry in (parent.files if parent else {}).items() if path not in deletions}
        for path in deletions:
            (staging / path).unlink()
        for path, data in additions.items():
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)  # a hard link to the parent's copy: replace it, never write through it
            target.write_bytes(data)
            files[path] = _Entry.of(path, data)
        sha = _commit_sha(repo_id, parent.sha if parent else None, files)
        repo = self._repos[repo_id]
        if sha in repo.commits:
            shutil.rmtree(staging)
        else:
            folder = self.root / repo_id / sha
            folder.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(folder)
            repo.commits[sha] = _Commit(sha, folder, dict(sorted(files.items())), title, _now())
        return repo.commits[sha]

    def _record(self, request: Request) -> None:
        with self._lock:
            self._log.append(request)

    # -- the HTTP API ------------------------------------------------------------------------------------------------

    def _answer(self, call: _Call) -> _Reply:
        if call.token == REVOKED_TOKEN:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        writes = ("create", "preupload", "commit", "branch")
        if call.method == "POST" and not call.token and any(part in writes for part in call.segments[:5]):
            raise HubError(401, None, "Invalid username or password.")  # as the Hub answers a write without a token
        match call.method, call.segments:
            case "GET", ["api", "whoami-v2"]:
                if not call.token:
                    raise HubError(401, None, "Invalid credentials in Authorization header")
                access = {"displayName": "local", "role": "write"}
                return _json({"type": "user", "name": USER, "orgs": [], "auth": {"accessToken": access}})
            case "POST", ["api", "validate-yaml"]:
                return _json({"errors": [], "warnings": []})
            case "POST", ["api", "repos", "create"]:
                return self._create_repo(call)
            case "GET", ["api", "models", owner, name]:
                return self._info(call, f"{owner}/{name}", "main")
            case "GET", ["api", "models", owner, name, "revision", revision]:
                return self._info(call, f"{owner}/{name}", revision)
            case "GET", ["api", "models", owner, name, "tree", revision, *path]:
                return self._tree(call, f"{owner}/{name}", revision, "/".join(path))
            case "POST", ["api", "models", owner, name, "paths-info", revision]:
                return self._paths_info(call, f"{owner}/{name}", revision)
            case "POST", ["api", "models", owner, name, "preupload", revision]:
                return self._preupload(call, f"{owner}/{name}", revision)
            case "POST", ["api", "models", owner, name, "commit", revision] if not call.flag("create_pr"):
                return self._create_commit(call, f"{owner}/{name}", revision)
            case "POST", ["api", "models", owner, name, "branch", branch]:
                return self._create_branch(call, f"{owner}/{name}", branch)
            case (("GET" | "HEAD"), [owner, name, "resolve", revision, *path]) if path:
                return self._resolve_file(call, f"{owner}/{name}", revision, "/".join(path))
        raise HubError(501, None, f"LocalHub does not implement {call.method} /{'/'.join(call.segments)} {call.query}")

    def _repo(self, repo_id: str, token: str | None) -> _Repo:
        """The Hub answers 401 without a token and 404 with one, both `RepoNotFound`, for a repo it does not have."""
        if repo_id not in self._repos:
            raise HubError(404 if token else 401, "RepoNotFound", "Repository not found")
        return self._repos[repo_id]

    def _readable(self, call: _Call, repo_id: str, revision: str) -> _Commit:
        """The commit `revision` names. Info and listings are not gated (on the Hub either): only `resolve` is."""
        with self._lock:
            self._repo(repo_id, call.token)
            return self._resolve(repo_id, revision)

    def _create_repo(self, call: _Call) -> _Reply:
        payload = json.loads(call.body)
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            raise HubError(400, None, f"LocalHub creates model repos named 'owner/name' only, not {payload}")
        repo_id = f"{payload['organization']}/{payload['name']}"
        url = f"{self.url}/{repo_id}"
        with self._lock:
            if repo_id in self._repos:  # as the Hub, with the url in the body: huggingface_hub's exist_ok reads it
                return _json({"error": "You already created this model repo", "url": url}, 409)
            self._repos[repo_id] = _Repo()
            # As on the Hub, a new repo starts with one commit: the default .gitattributes.
            initial = self._commit(repo_id, None, {".gitattributes": GITATTRIBUTES.encode()}, set(), "initial commit")
            self._repos[repo_id].refs["main"] = initial.sha
        return _json({"url": url, "name": repo_id})

    def _info(self, call: _Call, repo_id: str, revision: str) -> _Reply:
        """Model info; `?blobs=true` (files_metadata) adds each sibling's size, blob id and LFS sha256."""
        commit, repo = self._readable(call, repo_id, revision), self._repos[repo_id]
        siblings = [{"rfilename": path} for path in commit.files]
        for sibling, entry in zip(siblings, commit.files.values() if call.flag("blobs") else ()):
            lfs = {"lfs": {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}} if entry.sha256 else {}
            sibling.update(size=entry.size, blobId=entry.oid, **lfs)
        library = "diffusers" if "model_index.json" in commit.files else None
        tags = [library] * bool(library) + ["safetensors"] * any(p.endswith(".safetensors") for p in commit.files)
        return _json({
            "_id": commit.sha[:24], "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": commit.date, "createdAt": repo.created, "private": False,
            "disabled": False, "gated": "manual" if repo.gated else False, "downloads": 0, "likes": 0,
            "library_name": library, "tags": tags, "siblings": siblings, "spaces": [],
            "usedStorage": sum(entry.size for entry in commit.files.values()),
        })  # fmt: skip

    def _tree(self, call: _Call, repo_id: str, revision: str, path: str) -> _Reply:
        """The folder's entries, folders first; `?recursive=true` all below it. One page: no `Link` header."""
        commit = self._readable(call, repo_id, revision)
        entries = _listing(commit, call.flag("expand"))
        if path and entries.get(path, {}).get("type") != "directory":
            raise HubError(404, "EntryNotFound", f"{path} is no folder of {revision}", {"X-Repo-Commit": commit.sha})
        prefix, recursive = (path + "/" if path else ""), call.flag("recursive")
        below = [e for p, e in entries.items() if p.startswith(prefix) and (recursive or "/" not in p[len(prefix) :])]
        return _json(sorted(below, key=lambda entry: (entry["type"] != "directory", entry["path"])))

    def _paths_info(self, call: _Call, repo_id: str, revision: str) -> _Reply:
        """The entries of the form's `paths` that exist (huggingface_hub asks before copying or deleting)."""
        form = parse_qs(call.body.decode())
        entries = _listing(self._readable(call, repo_id, revision), form.get("expand", [""])[0].lower() == "true")
        return _json([entries[path] for path in form.get("paths", []) if path in entries])

    def _preupload(self, call: _Call, repo_id: str, revision: str) -> _Reply:
        """Every file "regular": its bytes come base64 in the commit. `oid` lets the client leave out unchanged files."""
        commit = self._readable(call, repo_id, revision)
        paths = [file["path"] for file in json.loads(call.body)["files"]]
        files = [{"path": path, "uploadMode": "regular", "shouldIgnore": False,
                  "oid": commit.files[path].oid if path in commit.files else None} for path in paths]  # fmt: skip
        return _json({"files": files, "commitOid": commit.sha})

    def _create_commit(self, call: _Call, repo_id: str, revision: str) -> _Reply:
        """The NDJSON commit: a header line, then `file` (base64), `deletedFile`, `deletedFolder`, `lfsFile` lines."""
        lines = [json.loads(line) for line in call.body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self._lock:
            parent = self._readable(call, repo_id, revision)
            if header.get("parentCommit") not in (None, parent.sha):
                raise HubError(412, None, f"parentCommit {header['parentCommit']} is not the head of {revision}")
            additions, deletions = self._operations(repo_id, parent, lines)
            commit = self._commit(repo_id, parent, additions, deletions, header["summary"])
            self._repos[repo_id].refs[revision] = commit.sha
        commit_url = f"{self.url}/{repo_id}/commit/{commit.sha}"
        return _json({"success": True, "commitOid": commit.sha, "commitUrl": commit_url, "pullRequestUrl": None})

    def _operations(self, repo_id: str, parent: _Commit, lines: list[dict]) -> tuple[dict[str, bytes], set[str]]:
        """(additions, deletions) of a commit's lines. An `lfsFile` (a copy of an LFS file) must name a blob the repo
        holds: the hub takes no LFS uploads."""
        additions, deletions = {}, set()
        for key, value in ((line["key"], line["value"]) for line in lines):
            if key == "file":
                additions[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                additions[value["path"]] = self._lfs_blob(repo_id, value["oid"])
            elif key in ("deletedFile", "deletedFolder"):
                folder = value["path"].rstrip("/") + "/"
                gone = {
                    p for p in parent.files if p == value["path"] or (key == "deletedFolder" and p.startswith(folder))
                }
                if not gone:
                    raise HubError(404, "EntryNotFound", f"A file with this name doesn't exist: {value['path']}")
                deletions |= gone
        return additions, deletions - additions.keys()

    def _lfs_blob(self, repo_id: str, sha256: str) -> bytes:
        for commit in self._repos[repo_id].commits.values():
            for path, entry in commit.files.items():
                if entry.sha256 == sha256:
                    return (commit.folder / path).read_bytes()
        raise HubError(400, None, f"LocalHub holds no LFS object {sha256}: it takes file contents inline only")

    def _create_branch(self, call: _Call, repo_id: str, branch: str) -> _Reply:
        with self._lock:
            repo = self._repo(repo_id, call.token)
            if branch in repo.refs:
                raise HubError(409, None, f"Reference already exists: refs/heads/{branch}")
            starting_point = json.loads(call.body or b"{}").get("startingPoint", "main")
            repo.refs[branch] = self._resolve(repo_id, starting_point).sha
        return _json({})

    def _resolve_file(self, call: _Call, repo_id: str, revision: str, path: str) -> _Reply:
        """A file's bytes (all, or the `Range` asked for), with the headers huggingface_hub reads from the HEAD it sends
        first: the commit, a quoted etag (for LFS files also the sha256 and size of the linked blob), the size."""
        with self._lock:
            repo = self._repo(repo_id, call.token)
            if repo.gated and call.token not in repo.accepted_tokens:
                raise _gated_error(repo_id, call.token, self.url)
            commit = self._resolve(repo_id, revision)
        if path not in commit.files:
            raise HubError(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        entry, sent = commit.files[path], (repo_id, path)
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{entry.oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream", "Content-Length": str(entry.size)}  # fmt: skip
        if entry.sha256:
            headers |= {"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)}
        if call.method == "HEAD":
            return _Reply(200, b"", headers)
        data = (commit.folder / path).read_bytes()
        if call.range is None:
            return _Reply(200, data, headers, sent)
        start, end = _byte_range(call.range, entry.size)
        if start > end:
            return _Reply(416, b"", {"Content-Range": f"bytes */{entry.size}"})
        headers |= {"Content-Range": f"bytes {start}-{end}/{entry.size}", "Content-Length": str(end + 1 - start)}
        return _Reply(206, data[start : end + 1], headers, sent)


def _listing(commit: _Commit, expand: bool) -> dict[str, dict]:
    """Every file and folder of a commit as the tree API lists it, by path (`expand` adds each one's last commit)."""
    last_commit = {"lastCommit": {"id": commit.sha, "title": commit.title, "date": commit.date}} if expand else {}
    entries = {path: {**entry.tree_json(path), **last_commit} for path, entry in commit.files.items()}
    folders = {path.rsplit("/", depth)[0] for path in commit.files for depth in range(1, path.count("/") + 1)}
    for folder in sorted(folders):
        inside = "\n".join(f"{p} {e['oid']}" for p, e in entries.items() if p.startswith(folder + "/"))
        oid = hashlib.sha1(inside.encode()).hexdigest()
        entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder, **last_commit}
    return entries


def _gated_error(repo_id: str, token: str | None, url: str) -> HubError:
    """The Hub's answers for a gated repo's files: 401 without a token, 403 with one that has not been accepted."""
    if token is None:
        return HubError(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have access to it and "
                                          "be authenticated to access it. Please log in.")  # fmt: skip
    return HubError(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the authorized "
                                      f"list. Visit {url}/{repo_id} to ask for access.")  # fmt: skip


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """(first, last) byte of a `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` header; first > last if unsatisfiable."""
    first, _, last = header.removeprefix("bytes=").partition("-")
    start, end = (size - int(last), size - 1) if not first else (int(first), int(last) if last else size - 1)
    return max(start, 0), min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients' connection pools expect; every reply has a length

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def log_message(self, format, *args):
        pass  # the hub keeps its own log

    def _serve(self, method: str) -> None:
        hub: LocalHub = self.server.hub
        url = urlsplit(self.path)
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        segments = [unquote(part) for part in url.path.split("/")[1:]]
        call = _Call(method, segments, parse_qs(url.query), body, token, self.headers.get("Range"))
        try:
            reply = hub._answer(call)
        except HubError as error:
            reply = error.reply()
        except Exception as error:  # a bug in the hub: say so in a 500 rather than drop the connection
            reply = HubError(500, None, f"LocalHub failed on {method} {url.path}: {error!r}").reply()
        hub._record(Request(method, unquote(url.path), url.query, reply.status, reply.sent))
        self.send_response(reply.status)
        for name, value in {"Content-Length": str(len(reply.body)), **reply.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(reply.body)


def start_session_hub() -> LocalHub:
    """Start the test session's LocalHub and point every Hub client of this process, and of the subprocesses it
    starts, at it: HF_ENDPOINT, a fresh HF_HOME (cache, token), online, no telemetry, no Xet, no token.

    Call it before anything imports huggingface_hub (directly, or through diffusers or transformers): the library
    reads these variables once, on import."""
    if "huggingface_hub" in sys.modules:
        raise RuntimeError("start_session_hub: huggingface_hub was imported before it, and keeps the endpoint and "
                           "cache it read then; call start_session_hub first (tests/conftest.py does)")  # fmt: skip
    root = Path(tempfile.mkdtemp(prefix="local-hub-"))
    hub = LocalHub(root / "repos").start()
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    atexit.register(hub.stop)  # atexit runs last-registered first: stop serving, then remove the files
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE",
                 "HF_ASSETS_CACHE", "HF_XET_CACHE", "TRANSFORMERS_CACHE", "HF_MODULES_CACHE"):  # fmt: skip
        os.environ.pop(name, None)  # each would override a path under HF_HOME, or authenticate
    os.environ.update(HF_ENDPOINT=hub.url, HF_HOME=str(root / "hf_home"), HF_HUB_OFFLINE="0",
                      HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1")  # fmt: skip
    return hub
