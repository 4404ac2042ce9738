"""One clear error for a hub repo that cannot be read as asked (missing, private, gated, no such revision), before
anything downloads: diffusers' loader would log "Couldn't connect to the Hub", fall back to the cache and fail
later with the Hub's answer deep in its traceback."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

LOGIN = "log in with `hf auth login` (or pass token=...)"


class HubAccessError(OSError):
    """The Hub refused a repo or revision: the message names the argument, the repo and what to do. An `OSError`,
    as diffusers' and transformers' loaders raise for a repo they cannot read."""


def check_hub_access(
    argument: str,
    source: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> None:
    """Ask the Hub for `source`'s `model_index.json` (a HEAD request, as the download's first one) when it is a hub
    id (not an existing folder) and the hub may be used; raise `HubAccessError` when the repo is missing or private,
    gated (the Hub serves a gated repo's model info, not its files), disabled, lacks `revision`, or when the Hub
    rejects the token (expired, revoked), or when the Hub cannot be reached and the cache does not hold the repo
    (diffusers would fail after its retries, saying the repo lacks model_index.json). Other answers (offline mode, no
    such file, a server error) pass: the loader then reads the cache or reports them as diffusers does."""
    if local_files_only or constants.HF_HUB_OFFLINE or Path(source).expanduser().is_dir():
        return
    repo = str(source)
    page = f"{constants.ENDPOINT}/{repo}"
    try:
        get_hf_file_metadata(hf_hub_url(repo, "model_index.json", revision=revision), token=token)
    except GatedRepoError as error:  # before RepositoryNotFoundError, its base class
        raise HubAccessError(
            f"{argument}={repo!r} is gated ({_status(error)}): accept its licence at {page} while logged in to the "
            f"Hub, then {LOGIN} with that account's token"
        ) from None
    except RepositoryNotFoundError as error:
        raise HubAccessError(
            f"{argument}={repo!r} is not a local folder and not a repo the Hub serves ({_status(error)}): check the "
            f"id; for a private repo, {LOGIN}"
        ) from None
    except RevisionNotFoundError as error:
        raise HubAccessError(
            f"{argument}={repo!r} has no revision {revision!r} ({_status(error)}); expected a branch, tag or commit "
            f"of {page}"
        ) from None
    except DisabledRepoError as error:
        raise HubAccessError(f"{argument}={repo!r} is disabled on the Hub ({_status(error)}): {page}") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):  # not a repo answer: the token itself (expired, revoked, without read access)
            raise HubAccessError(
                f"{argument}={repo!r}: the Hub rejected the token ({_status(error)}: {_server_message(error)}); "
                f"{LOGIN} with a valid token"
            ) from None
    except Exception as error:  # no answer at all (no network, the Hub down): the cache may still hold the repo
        if try_to_load_from_cache(repo, "model_index.json", cache_dir=cache_dir, revision=revision) is None:
            raise HubAccessError(
                f"{argument}={repo!r}: the Hub at {constants.ENDPOINT} cannot be reached ({type(error).__name__}) and "
                f"the repo is not in the cache ({cache_dir or constants.HF_HUB_CACHE}): connect, or give a folder holding it"
            ) from None


def hub_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `from_pretrained` keywords `check_hub_access` takes."""
    keys = ("revision", "token", "local_files_only", "cache_dir")
    return {key: kwargs[key] for key in keys if kwargs.get(key) is not None}


def _status(error: Exception) -> str:
    response = getattr(error, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(error).__name__


def _server_message(error: Exception) -> str:
    response = getattr(error, "response", None)
    return (response.headers.get("X-Error-Message") if response is not None else None) or str(error).splitlines()[0]
