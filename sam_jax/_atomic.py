"""Outputs that appear whole or not at all: every file and folder sam_jax writes goes through here.

Each is written under a temporary name in its final folder, then renamed into place (`os.replace`,
atomic on one file system): an interrupted run (an error, Ctrl-C) leaves neither a half-written
output under the final name nor a temporary one. The result gets the permissions the umask gives
new files and folders, where `tempfile` and safetensors create them private (0600 / 0700).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # a clear message, where each writer would fail its own way
        raise FileNotFoundError(errno.ENOENT, "no such folder", parent)
    return parent


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary file path (same folder and extension as `path`) for the block to write;
    renames it to `path` when the block ends, deletes it when the block raises."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=_parent(path))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary, empty folder for the block to fill; it replaces `path` when the block
    ends (an existing folder is removed only after the new one is in place), and is deleted when
    the block raises."""
    path = os.fspath(path)
    parent = _parent(path)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(path):
            # os.replace cannot put a folder over a non-empty one: move the old one aside first.
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
