"""The Hub on localhost (tests/local_hub.py) against the real huggingface_hub client: what it downloads and how often,
revisions, the Hub's four errors, and pushes that round-trip. Tiny files only; no models."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import CommitOperationDelete, HfApi
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

FILES = {
    "config.json": b'{"answer": 42}',
    "README.md": b"# tiny\n",
    "sub/model.safetensors": bytes(range(256)) * 3,  # LFS by its suffix: sha256 etag
    "sub/notes.txt": b"hello",
}
TOKEN = "hf_local_test"  # the hub takes any bearer token


def write(folder: Path, files: dict[str, bytes]) -> Path:
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return folder


def files_in(folder: Path | str) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def hub(local_hub):
    local_hub.clear_log()
    return local_hub


@pytest.fixture
def repo_id(hub, tmp_path) -> str:
    """A fresh repo holding FILES on main; a new id each time, so that the session's shared cache starts cold."""
    repo_id = f"someone/tiny-{uuid.uuid4().hex[:8]}"
    hub.add_repo(repo_id, write(tmp_path / "main", FILES))
    return repo_id


def resolve_gets(hub) -> list[str]:
    return [r.path for r in hub.requests if r.method == "GET" and "/resolve/" in r.path]


def test_snapshot_download_fetches_each_file_once(hub, repo_id):
    folder = huggingface_hub.snapshot_download(repo_id)
    assert files_in(folder) == FILES and sorted(hub.downloaded(repo_id)) == sorted(FILES)
    assert Path(folder).is_relative_to(os.environ["HF_HOME"])  # the session's fresh cache, not the user's

    hub.clear_log()
    assert huggingface_hub.snapshot_download(repo_id) == folder
    assert resolve_gets(hub) == [] and hub.downloaded(repo_id) == []  # warm cache: metadata only


def test_snapshot_download_with_allow_patterns_fetches_only_those(hub, repo_id):
    folder = huggingface_hub.snapshot_download(repo_id, allow_patterns=["*.json", "sub/*.txt"])
    assert sorted(hub.downloaded(repo_id)) == ["config.json", "sub/notes.txt"]
    assert sorted(files_in(folder)) == ["config.json", "sub/notes.txt"]


def test_lfs_file_is_named_and_checked_by_its_sha256(hub, repo_id, tmp_path):
    data, sha256 = FILES["sub/model.safetensors"], hashlib.sha256(FILES["sub/model.safetensors"]).hexdigest()
    url = huggingface_hub.hf_hub_url(repo_id, "sub/model.safetensors")
    metadata = huggingface_hub.get_hf_file_metadata(url)
    assert (metadata.etag, metadata.size, metadata.commit_hash) == (sha256, len(data), hub.commit_sha(repo_id))

    path = Path(huggingface_hub.hf_hub_download(repo_id, "sub/model.safetensors"))
    assert path.read_bytes() == data and path.resolve().name == sha256  # the cache stores LFS blobs by sha256

    # A local_dir file without download metadata: the client hashes it and downloads only if the sha256 differs.
    local = write(tmp_path / "local", {"sub/model.safetensors": data})
    hub.clear_log()
    huggingface_hub.hf_hub_download(repo_id, "sub/model.safetensors", local_dir=local)
    assert hub.downloaded(repo_id) == []
    local = write(tmp_path / "other", {"sub/model.safetensors": bytes(len(data))})  # same size, other bytes
    huggingface_hub.hf_hub_download(repo_id, "sub/model.safetensors", local_dir=local, cache_dir=tmp_path / "cold")
    assert hub.downloaded(repo_id) == ["sub/model.safetensors"]
    assert (local / "sub/model.safetensors").read_bytes() == data


def test_a_branch_is_its_own_revision(hub, repo_id, tmp_path):
    branch_files = {"config.json": b'{"answer": 16}', "sub/model.fp16.safetensors": b"half"}
    sha = hub.add_branch(repo_id, "fp16-only", write(tmp_path / "fp16", branch_files))

    assert sha != hub.commit_sha(repo_id) and huggingface_hub.model_info(repo_id, revision="fp16-only").sha == sha
    assert files_in(huggingface_hub.snapshot_download(repo_id, revision="fp16-only")) == branch_files
    assert sorted(huggingface_hub.list_repo_files(repo_id, revision=sha)) == sorted(branch_files)
    assert Path(huggingface_hub.hf_hub_download(repo_id, "config.json")).read_bytes() == FILES["config.json"]


def test_range_requests_get_part_of_a_file(hub, repo_id):
    request = urllib.request.Request(f"{hub.url}/{repo_id}/resolve/main/sub/notes.txt", headers={"Range": "bytes=1-3"})
    with urllib.request.urlopen(request) as response:
        assert (response.status, response.read(), response.headers["Content-Range"]) == (206, b"ell", "bytes 1-3/5")


def test_missing_repo_is_repository_not_found(hub):
    with pytest.raises(RepositoryNotFoundError, match="someone/missing") as no_token:
        huggingface_hub.hf_hub_download("someone/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError, match="someone/missing") as with_token:
        huggingface_hub.model_info("someone/missing", token=TOKEN)
    assert type(no_token.value) is type(with_token.value) is RepositoryNotFoundError
    assert (no_token.value.response.status_code, with_token.value.response.status_code) == (401, 404)


def test_gated_repo_is_gated_repo_error_until_accepted(hub, repo_id):
    hub.set_gated(repo_id, True, accepted_tokens=(TOKEN,))
    with pytest.raises(GatedRepoError, match=repo_id) as no_token:
        huggingface_hub.hf_hub_download(repo_id, "config.json")
    with pytest.raises(GatedRepoError, match=repo_id) as not_accepted:
        huggingface_hub.hf_hub_download(repo_id, "config.json", token="hf_not_accepted")
    assert (no_token.value.response.status_code, not_accepted.value.response.status_code) == (401, 403)
    assert huggingface_hub.model_info(repo_id).gated == "manual"  # the Hub gates files, not the repo's info
    accepted = huggingface_hub.hf_hub_download(repo_id, "config.json", token=TOKEN)
    assert Path(accepted).read_bytes() == FILES["config.json"]


def test_missing_file_and_revision(hub, repo_id):
    with pytest.raises(EntryNotFoundError, match=repo_id) as missing_file:
        huggingface_hub.hf_hub_download(repo_id, "missing.json")
    assert isinstance(missing_file.value, HfHubHTTPError) and missing_file.value.response.status_code == 404
    with pytest.raises(RevisionNotFoundError, match=repo_id):
        huggingface_hub.hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError, match=repo_id):
        huggingface_hub.snapshot_download(repo_id, revision="no-such-branch")


def test_pushes_round_trip(hub, tmp_path):
    api, repo_id = HfApi(token=TOKEN), f"me/pushed-{uuid.uuid4().hex[:8]}"
    api.create_repo(repo_id)
    api.create_repo(repo_id, exist_ok=True)  # the hub answers 409, which exist_ok accepts
    created = hub.commit_sha(repo_id)  # as on the Hub, a new repo holds one commit: .gitattributes
    first = api.upload_folder(repo_id=repo_id, folder_path=write(tmp_path / "up", FILES), commit_message="up")
    assert huggingface_hub.model_info(repo_id).sha == first.oid != created
    pushed = files_in(huggingface_hub.snapshot_download(repo_id))
    assert pushed == {**FILES, ".gitattributes": pushed[".gitattributes"]}

    api.upload_file(path_or_fileobj=b"more", path_in_repo="sub/more.txt", repo_id=repo_id)
    api.create_commit(repo_id, [CommitOperationDelete("sub/notes.txt")], commit_message="drop the notes")
    assert huggingface_hub.model_info(repo_id).sha not in (created, first.oid)
    now = files_in(huggingface_hub.snapshot_download(repo_id))
    assert "sub/notes.txt" not in now and now["sub/more.txt"] == b"more"
    assert files_in(hub.repo_folder(repo_id, first.oid)) == pushed  # earlier commits stay as they were


def test_push_to_a_branch_leaves_main(hub, repo_id):
    api, main = HfApi(token=TOKEN), hub.commit_sha(repo_id)
    api.create_branch(repo_id, branch="dev")
    commit = api.upload_file(path_or_fileobj=b"dev", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    assert hub.commit_sha(repo_id, "dev") == commit.oid and hub.commit_sha(repo_id) == main
    assert (hub.repo_folder(repo_id, "dev") / "dev.txt").read_bytes() == b"dev"


def test_subprocesses_talk_to_the_same_hub(hub, repo_id):
    code = f"import huggingface_hub; print(huggingface_hub.model_info({repo_id!r}).sha)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == hub.commit_sha(repo_id)
