"""Writing a folder or a file all at once: readers see the old one or the complete new one, never a half-written
one."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def check_writable_folder(path: str | Path, overwrite: bool, argument: str = "output") -> Path:
    """Fail before any work if `path` is a file, or a non-empty folder and `overwrite` is off."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{argument}={str(path)!r} is a file; expected a folder path")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(
            f"{argument}={str(path)!r} exists and is not empty; pass overwrite (--overwrite) to replace it"
        )
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` by renames, on failure it is removed
    and `path` is left as it was. The folder gets the permissions `mkdir` gives under the umask (as a plain
    `save_pretrained` folder), not `mkdtemp`'s owner-only 0o700."""
    path = check_writable_folder(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _new_sibling(path, "partial")
    old = None
    try:
        yield staging
        if path.exists():
            old = _new_sibling(path, "old")
            path.rename(old / path.name)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            (old / path.name).rename(path)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _new_sibling(path: Path, tag: str) -> Path:
    """A new empty hidden folder `.NAME.TAG-<random>` beside `path`, made by `mkdir` under the umask."""
    folder = path.parent / f".{path.name}.{tag}-{uuid.uuid4().hex}"
    folder.mkdir()
    return folder


PARTIAL_SUFFIX = ".partial"  # of the hidden temporary files `atomic_file` writes (a killed writer leaves them)


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path` (`.NAME.PID.partial`) to write; on success it is flushed to disk
    and renamed to `path` (replacing it), on failure removed. Several processes may write the same `path`."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        yield partial
        with open(partial, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
