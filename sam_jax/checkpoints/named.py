"""Weights by name: `sam_jax.load("vit_b")`, `sam_jax.load("facebook/sam-vit-base")`, `--weights vit_b`.

A name is either one of `REGISTRY` (the official checkpoints, at their publisher's address, each
with a pinned sha256) or a Hugging Face repository id (`org/name`, e.g. `facebook/sam-vit-base` or a
fine-tune published the same way). The first use downloads the checkpoint, checks it, converts it
once with the real converter and keeps the converted sam_jax `.safetensors` in the cache; later
uses read that file and touch no network. A path that exists always means that file.

The cache folder is `$SAM_JAX_HOME`, else the platform's user cache folder (`sam_jax`):

    <home>/vit_b.safetensors                 a registry name, converted
    <home>/hub/facebook--sam-vit-base.safetensors   a Hugging Face id, converted
    <home>/downloads/sam_vit_b_01ec64.pth    a download, removed once converted (place a file here
                                             by hand where there is no network: its hash is checked)
    <home>/locks/                            one lock per name: a second process waits, then reads

Downloads go through pooch (streamed to a temporary file, hash checked before it is renamed into
place, retried, a progress bar) and Hub ids through `huggingface_hub` (the Hub's own revisions,
hashes and cache, `HF_HUB_OFFLINE` included). `$SAM_JAX_REGISTRY` names a JSON file of more
entries, `{"name": {"url": ..., "sha256": ..., "model_type": "vit_b"}}`, which add to or replace
the built-in ones (a mirror, a private fine-tune); `$SAM_JAX_TIMEOUT` sets the seconds a download
may wait for the server (default 60).

Errors are one line: `ValueError` for a name that is not known (the known ones are listed),
`DownloadError` (an `OSError`) for what the network or the disk did; nothing half-downloaded or
half-converted is left under a final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import time
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import first_line

HOME_ENV = "SAM_JAX_HOME"
REGISTRY_ENV = "SAM_JAX_REGISTRY"
TIMEOUT_ENV = "SAM_JAX_TIMEOUT"
DEFAULT_TIMEOUT = 60.0
RETRIES = 2  # after the first try: a dropped connection or a truncated body is tried again
RETRY_WAIT_S = 1.0  # before try k + 1 (k = 1, 2): k times this
LOCK_TIMEOUT = 3600.0  # seconds a process waits for another one fetching the same name

# Hugging Face repository ids: "org/name", letters, digits and -_. (the Hub forbids "--" and "..").
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # registry names: plain file names in the cache
_FILE_SUFFIXES = (".pth", ".pt", ".safetensors", ".bin", ".ckpt")


class DownloadError(OSError):
    """Weights could not be fetched: no network, an HTTP error, a timeout, a hash mismatch, a full
    disk. The message is one line and says what to do."""

    def __str__(self) -> str:  # OSError renders "[Errno ...]" prefixes; ours is the message alone
        return str(self.args[0]) if self.args else ""


@dataclasses.dataclass(frozen=True)
class Weights:
    """One registry entry: where the official checkpoint lives and what it must hash to."""

    url: str
    sha256: str
    model_type: str = "auto"

    @property
    def filename(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


_FB = "https://dl.fbaipublicfiles.com/segment_anything"
# The sha256 of each official file (its name carries the first hex digits of its md5).
BUILTIN: Dict[str, Weights] = {
    "vit_b": Weights(
        f"{_FB}/sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "vit_b"
    ),
    "vit_l": Weights(
        f"{_FB}/sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "vit_l"
    ),
    "vit_h": Weights(
        f"{_FB}/sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "vit_h"
    ),
}


def registry() -> Dict[str, Weights]:
    """The built-in entries, with `$SAM_JAX_REGISTRY`'s added or replacing them."""
    entries = dict(BUILTIN)
    path = os.environ.get(REGISTRY_ENV)
    if not path:
        return entries
    try:
        with open(path) as f:
            extra = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"${REGISTRY_ENV}={path}: cannot read a JSON registry ({e})") from None
    if not isinstance(extra, dict):
        raise ValueError(f"${REGISTRY_ENV}={path}: expected a JSON object of name -> {{url, sha256}}")
    for name, entry in extra.items():
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"${REGISTRY_ENV}={path}: name {name!r} must be letters, digits and _.- (not starting with .)"
            )
        if not isinstance(entry, dict) or not isinstance(entry.get("url"), str) or not _is_sha256(entry.get("sha256")):
            raise ValueError(
                f"${REGISTRY_ENV}={path}: entry {name!r} needs a 'url' and a 64-hex-digit 'sha256', got {entry!r}"
            )
        entries[name] = Weights(entry["url"], entry["sha256"].lower(), str(entry.get("model_type", "auto")))
    return entries


def _is_sha256(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{64}", value) is not None


def home() -> str:
    """The cache folder: `$SAM_JAX_HOME`, else the platform's user cache folder."""
    path = os.environ.get(HOME_ENV)
    if path:
        return os.path.abspath(os.path.expanduser(path))
    try:
        import platformdirs  # in the weights extra (and pooch's own dependency)
    except ImportError:
        return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME") or "~/.cache"), "sam_jax")
    return platformdirs.user_cache_dir("sam_jax")


def is_hub_id(name: str) -> bool:
    """`org/name` as the Hub spells repository ids (and not a file name such as `dir/w.pth`)."""
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name and not name.endswith(_FILE_SUFFIXES)


def known_names() -> List[str]:
    return sorted(registry())


def describe_known() -> str:
    """One line for error messages: the known names and the Hub id form."""
    return f"known names: {', '.join(known_names())}, or a Hugging Face repository id such as facebook/sam-vit-base"


def cached_path(name: str) -> str:
    """Where the converted weights of NAME live (whether or not they are there yet)."""
    if name in registry():
        return os.path.join(home(), f"{name}.safetensors")
    if is_hub_id(name):
        return os.path.join(home(), "hub", name.replace("/", "--") + ".safetensors")
    raise ValueError(f"unknown weights name {name!r}; {describe_known()}")


def is_name(path_or_name: str) -> bool:
    """Whether a string that is not an existing path names weights (a registry name or a Hub id)."""
    return path_or_name in registry() or is_hub_id(path_or_name)


@contextlib.contextmanager
def lock(name: str) -> Iterator[None]:
    """Held while NAME is fetched and converted: a second process waits here, then finds the
    converted file in place instead of downloading it again."""
    _require("filelock")
    from filelock import FileLock, Timeout

    locks = os.path.join(home(), "locks")
    _makedirs(locks)
    try:
        with FileLock(os.path.join(locks, os.path.basename(cached_path(name)) + ".lock"), timeout=LOCK_TIMEOUT):
            yield
    except Timeout:
        raise DownloadError(f"{name}: another process has been fetching it for {LOCK_TIMEOUT:.0f} s") from None


def download(name: str, *, progress: bool = True, timeout: Optional[float] = None) -> Tuple[str, str, str]:
    """Downloads and checks NAME's checkpoint; returns (file or folder, model type, source) for
    the converter. Call it under `lock(name)`."""
    _makedirs(os.path.dirname(cached_path(name)))
    entries = registry()
    if name in entries:
        return _download_registered(name, entries[name], progress, _timeout(timeout))
    return _download_hub(name, _timeout(timeout))


def discard_download(name: str) -> None:
    """Removes NAME's downloaded checkpoint once it is converted (the Hub's cache is its own)."""
    entries = registry()
    if name in entries:
        _remove(os.path.join(home(), "downloads", entries[name].filename))


def _timeout(timeout: Optional[float]) -> float:
    if timeout is not None:
        return float(timeout)
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"${TIMEOUT_ENV} must be a number of seconds, got {value!r}") from None
    if not seconds > 0:
        raise ValueError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {value!r}")
    return seconds


def _download_registered(name: str, entry: Weights, progress: bool, timeout: float) -> Tuple[str, str, str]:
    """One registry entry through pooch (written to a temporary file, its sha256 checked before it
    is renamed into place; a file already there is checked, not downloaded again), with a progress
    bar per try; a dropped connection, a timeout or a server error is tried again."""
    _require("pooch")
    import pooch
    import requests
    from tqdm.auto import tqdm

    downloads = os.path.join(home(), "downloads")
    where = os.path.join(downloads, entry.filename)
    pooch.get_logger().setLevel("WARNING")  # its "Downloading ..." line would repeat what the bar shows
    for attempt in range(RETRIES + 1):
        bar = tqdm(total=None, unit="B", unit_scale=True, ncols=79, leave=True, desc=name) if progress else None
        try:
            path = pooch.retrieve(
                entry.url,
                f"sha256:{entry.sha256}",
                fname=entry.filename,
                path=downloads,
                downloader=_http_download(bar, timeout),
            )
            return path, entry.model_type, f"{entry.url} sha256:{entry.sha256}"
        except Exception as e:  # noqa: BLE001 - sorted below; anything unexpected is re-raised
            transient = isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)) or (
                isinstance(e, requests.exceptions.HTTPError)
                and e.response is not None
                and e.response.status_code >= 500
            )
            if transient and attempt < RETRIES:
                time.sleep(RETRY_WAIT_S * (attempt + 1))
                continue
            raise _download_error(name, entry, where, timeout, e, attempt + 1) from None
        finally:
            if bar is not None:
                bar.close()
    raise AssertionError("unreachable")  # the loop returns or raises


def _http_download(bar, timeout: float):
    """pooch's downloader interface, `(url, output_file, pooch)`: one streamed GET whose response
    is closed however it ends (a stalled body included), counting into BAR (a tqdm or None)."""
    import requests

    def download(url: str, output_file: str, _pooch) -> None:
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            if bar is not None:
                bar.reset(total=int(response.headers.get("content-length", 0)) or None)
            with open(output_file, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))

    return download


def _download_error(name: str, entry: Weights, where: str, timeout: float, e: Exception, tries: int) -> Exception:
    """The one-line error for a failed download (pooch and requests raise many kinds)."""
    import requests

    tried = f" ({tries} tries)" if tries > 1 else ""
    by_hand = f"without network, place {entry.filename} at {where} by hand (its sha256 is checked)"
    if isinstance(e, ValueError) and "hash" in str(e).lower():  # pooch: the bytes do not hash to the pin
        return DownloadError(
            f"{name}: the file from {entry.url} does not match its pinned sha256 (truncated or altered); "
            "it was deleted, not converted"
        )
    if isinstance(e, requests.exceptions.HTTPError):
        code = e.response.status_code if e.response is not None else "?"
        return DownloadError(f"{name}: {entry.url} answered HTTP {code}{tried}")
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        return DownloadError(f"{name}: the connection to {entry.url} broke off before the end of the file{tried}")
    # A read timeout in the middle of the body arrives as a ConnectionError, not a Timeout.
    if isinstance(e, requests.exceptions.Timeout) or "timed out" in str(e).lower():
        return DownloadError(
            f"{name}: {entry.url} stopped answering for {timeout:g} s{tried} (${TIMEOUT_ENV} sets the limit)"
        )
    if isinstance(e, requests.exceptions.ConnectionError):
        return DownloadError(f"{name}: cannot reach {entry.url} (no network?){tried}; {by_hand}")
    if isinstance(e, requests.exceptions.RequestException):
        return DownloadError(f"{name}: cannot download {entry.url} ({type(e).__name__}){tried}; {by_hand}")
    if isinstance(e, OSError):
        return DownloadError(f"{name}: cannot write {where}: {e.strerror or e}")
    return e


def _download_hub(repo_id: str, timeout: float) -> Tuple[str, str, str]:
    """A Hugging Face SAM repository's config.json and model.safetensors through huggingface_hub
    (its cache, revisions, hashes and progress bars)."""
    _require("huggingface_hub")
    import huggingface_hub
    from huggingface_hub import errors

    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            allow_patterns=["config.json", "model.safetensors"],
            etag_timeout=timeout,
        )
    except (errors.RepositoryNotFoundError, errors.GatedRepoError, errors.HFValidationError) as e:
        raise ValueError(f"{repo_id}: not a Hugging Face repository this machine can read ({first_line(e)})") from None
    except errors.LocalEntryNotFoundError:
        raise DownloadError(
            f"{repo_id}: not in the Hugging Face cache and the Hub cannot be reached (offline or HF_HUB_OFFLINE set)"
        ) from None
    except Exception as e:  # noqa: BLE001 - HfHubHTTPError, OSError, and the transport's own (httpx, ...)
        raise DownloadError(f"{repo_id}: cannot download from the Hugging Face Hub ({first_line(e)})") from None
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        raise ValueError(
            f"{repo_id}: the repository has no model.safetensors (expected SAM weights in transformers' layout)"
        )
    revision = os.path.basename(os.path.normpath(folder))
    return folder, "auto", f"hf://{repo_id}@{revision}"


def cached() -> List[Tuple[str, str, int]]:
    """(name, path, bytes) of every converted file in the cache."""
    out = []
    root = home()
    for name in known_names():
        path = cached_path(name)
        if os.path.isfile(path):
            out.append((name, path, os.path.getsize(path)))
    hub = os.path.join(root, "hub")
    if os.path.isdir(hub):
        for fn in sorted(os.listdir(hub)):
            if fn.endswith(".safetensors") and not fn.startswith("."):
                path = os.path.join(hub, fn)
                out.append((fn[: -len(".safetensors")].replace("--", "/", 1), path, os.path.getsize(path)))
    return out


def clear(name: Optional[str] = None) -> List[Tuple[str, int]]:
    """Removes the cached weights of NAME (all names when None) and leftover downloads; returns
    (path, bytes) of what was removed. Only sam_jax's own files: the Hugging Face cache and anything
    else in the folder stay."""
    root = home()
    if name is not None:
        paths = [cached_path(name)]
        if name in registry():
            paths.append(os.path.join(root, "downloads", registry()[name].filename))
    else:
        paths = [p for _, p, _ in cached()]
        downloads = os.path.join(root, "downloads")
        if os.path.isdir(downloads):
            paths += [os.path.join(downloads, f) for f in sorted(os.listdir(downloads))]
    removed = []
    for path in paths:
        if os.path.isfile(path):
            size = os.path.getsize(path)
            _remove(path)
            removed.append((path, size))
    return removed


def _require(module: str) -> None:
    """Weights by name need the `weights` extra; say so in one line rather than a traceback."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise DownloadError(f"weights by name need {module}: pip install 'sam-jax[weights]'")


def _makedirs(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create the weights cache folder {path}: {e.strerror or e} (${HOME_ENV} sets the folder)"
        ) from None


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
