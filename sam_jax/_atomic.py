"""Outputs that appear whole or not at all: every file and folder sam_jax writes goes through here.

Each is written under a temporary name in its final folder, then renamed into place (`os.replace`,
atomic on one file system): an interrupted run (an error, Ctrl-C) leaves neither a half-written
output under the final name nor a temporary one. The result gets the permissions the umask gives
new files and folders (the temporaries are created private, 0600 / 0700).

A process that is killed (SIGKILL, a lost machine) cannot clean up: its temporary stays. The
temporary of an output NAME is therefore named after it, `.NAME.XXXXXXXX.tmp` (8 hex digits; a
file's temporary ends with NAME's extension too, `.photo.png.1f0c9a2e.tmp.png`; a folder being
replaced waits as `.NAME.XXXXXXXX.old` until its successor is in place), so that
`remove_stale` can tell exactly which output a leftover belongs to: a writer that knows no other
process writes NAME removes its leftovers before writing again, and leaves everyone else's alone.
(A NAME too long for that gets an anonymous temporary, `.tmp-XXXXXXXX`, which nothing removes.)
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from typing import Dict, Iterable, Iterator, List, Optional, Set

_TAGS = ("tmp", "old")  # "old": an output being replaced, moved aside until its successor is in place


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):  # a clear message, where each writer would fail its own way
        raise FileNotFoundError(errno.ENOENT, "no such folder", parent)
    return parent


def _temporary(path: str, tag: str, folder: bool) -> str:
    """Creates (private, empty) and returns a new temporary beside `path`, named after it."""
    parent, name = os.path.split(os.path.abspath(path))
    ext = "" if folder else os.path.splitext(name)[1]
    named = True
    while True:
        token = secrets.token_hex(4)
        tmp = os.path.join(parent, f".{name}.{token}.{tag}{ext}" if named else f".tmp-{token}{ext}")
        try:
            if folder:
                os.mkdir(tmp, 0o700)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return tmp
        except FileExistsError:
            continue  # the same 8 hex digits drawn twice: draw again
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG or not named:
                raise
            named = False


def _owner(entry: str) -> Optional[str]:
    """The output name whose temporary `entry` (a name in a folder) is, or None: the inverse of
    the naming above. The 8 hex digits, the tag and the extension have fixed places, so at most
    one name fits."""
    ext = os.path.splitext(entry)[1]
    for tag in _TAGS:
        for e in dict.fromkeys((ext, "")):  # a file's temporary (NAME's extension) or a folder's (none)
            tail = f".{tag}{e}"
            if not entry.startswith(".") or not entry.endswith(tail):
                continue
            stem = entry[1 : len(entry) - len(tail)]  # NAME.XXXXXXXX
            name, dot, token = stem[:-9], stem[-9:-8], stem[-8:]
            hexadecimal = all(c in "0123456789abcdef" for c in token)
            if name and dot == "." and hexadecimal and (not e or os.path.splitext(name)[1] == e):
                return name
    return None


def remove_stale(paths: Iterable[str | os.PathLike]) -> List[str]:
    """Removes the temporaries that writing `paths` left behind when the writer was killed, and
    returns them (sorted). Only for a caller that knows no other live process writes any of these
    paths: it is the temporaries' names that tie them to `paths`, so the leftovers of every other
    output, live or stale, are left alone."""
    wanted: Dict[str, Set[str]] = {}
    for p in paths:
        parent, name = os.path.split(os.path.abspath(p))
        wanted.setdefault(parent, set()).add(name)
    removed = []
    for parent, names in wanted.items():
        try:
            entries = os.listdir(parent)
        except FileNotFoundError:
            continue
        for entry in entries:
            if _owner(entry) not in names:
                continue
            tmp = os.path.join(parent, entry)
            with contextlib.suppress(FileNotFoundError):
                if os.path.isdir(tmp) and not os.path.islink(tmp):
                    shutil.rmtree(tmp)
                else:
                    os.unlink(tmp)
                removed.append(tmp)
    return sorted(removed)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary file path (same folder and extension as `path`) for the block to write;
    renames it to `path` when the block ends, deletes it when the block raises. A folder at `path`
    raises IsADirectoryError before anything is written."""
    path = os.fspath(path)
    _parent(path)
    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, "is a folder, cannot write a file there", path)
    tmp = _temporary(path, "tmp", folder=False)
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
    the block raises. A file at `path` raises NotADirectoryError before anything is written."""
    path = os.fspath(path)
    _parent(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, "is a file, cannot write a folder there", path)
    tmp = _temporary(path, "tmp", folder=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(path):
            # os.replace cannot put a folder over a non-empty one: move the old one aside first.
            old = _temporary(path, "old", folder=True)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
