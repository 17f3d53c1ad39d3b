"""Weights by name, with no network: a local HTTP server on 127.0.0.1 plays the publisher.

The test registry (`$SAM_JAX_REGISTRY`) points the name `tiny_test` at the randomised official
`.pth` of the `tiny` fixture, served by `Publisher`; `$SAM_JAX_HOME` is a temporary folder. Hub ids
are resolved by huggingface_hub from a Hugging Face cache laid out on disk (`HF_HUB_OFFLINE=1`),
in a subprocess, as huggingface_hub reads its environment once, at import.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import sam_jax
from sam_jax.checkpoints import named
from sam_jax.checkpoints.named import DownloadError
from sam_jax.checkpoints.sources import fetch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 1.0  # seconds: the stalled-server test must end in seconds, not minutes


class Publisher(http.server.ThreadingHTTPServer):
    """Serves `files` under /ok/, /truncated/ (half the body, then the connection closes), /stall/
    (headers and a first chunk, then silence until the test ends); anything else is a 404. Counts
    the requests it answers."""

    daemon_threads = True

    def __init__(self, files):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.requests, self.release = files, [], threading.Event()

    def url(self, mode: str, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{mode}/{name}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the name http.server calls
        srv: Publisher = self.server  # type: ignore[assignment]
        srv.requests.append(self.path)
        _, mode, name = self.path.split("/", 2)
        body = srv.files.get(name)
        if body is None or mode not in ("ok", "truncated", "stall"):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode == "ok":
            self.wfile.write(body)
        elif mode == "truncated":
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
        else:
            self.wfile.write(body[:1024])
            self.wfile.flush()
            srv.release.wait(60)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pth_bytes(tiny) -> bytes:
    with open(tiny.pth, "rb") as f:
        return f.read()


@pytest.fixture
def publisher(pth_bytes):
    srv = Publisher({"sam_tiny.pth": pth_bytes})
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch, publisher, pth_bytes):
    """SAM_JAX_HOME in tmp_path and a registry whose entries point at `publisher`; returns a
    function that writes the registry: {name: (mode, sha256 or None for the right one)}."""
    home = tmp_path / "home"
    monkeypatch.setenv(named.HOME_ENV, str(home))
    monkeypatch.setenv(named.TIMEOUT_ENV, str(TIMEOUT))
    monkeypatch.setattr(named, "RETRY_WAIT_S", 0.05)  # the tries are counted, not the waits between them
    reg = tmp_path / "registry.json"
    monkeypatch.setenv(named.REGISTRY_ENV, str(reg))
    good = hashlib.sha256(pth_bytes).hexdigest()

    def write(entries=None, url=None):
        entries = entries or {"tiny_test": ("ok", None)}
        reg.write_text(
            json.dumps(
                {
                    name: {"url": url or publisher.url(mode, "sam_tiny.pth"), "sha256": sha or good}
                    for name, (mode, sha) in entries.items()
                }
            )
        )
        return home

    write()
    return write


def files_under(folder) -> list:
    """Every file below FOLDER except the lock files (they stay, empty, by design)."""
    out = []
    for dirpath, _, names in os.walk(folder):
        out += [os.path.relpath(os.path.join(dirpath, n), folder) for n in names if not n.endswith(".lock")]
    return sorted(out)


def run(capsys, *args) -> subprocess.CompletedProcess:
    """`sam-jax ARGS` in this process (a subprocess would pay jax's import again)."""
    from sam_jax.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`sam-jax ARGS` in a subprocess, for what needs its own process (its environment, a race)."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "sam_jax.cli", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def one_error_line(r: subprocess.CompletedProcess, prog: str = "sam-jax weights") -> str:
    """The CLI's error: exactly one line, the last one on stderr (progress bars may precede it)."""
    lines = r.stderr.rstrip("\n").splitlines()
    assert lines and lines[-1].startswith(f"{prog}: error: "), r.stderr
    assert sum("error" in line for line in lines) == 1, r.stderr
    return lines[-1]


def assert_same_params(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def test_first_fetch_shows_progress_converts_and_a_second_load_touches_no_network(cache, publisher, tiny, capsys):
    home = cache()
    r = run(capsys, "weights", "fetch", "tiny_test")
    assert r.returncode == 0, r.stderr
    assert "100%" in r.stderr  # pooch's tqdm progress bar, on stderr
    target = str(home / "tiny_test.safetensors")
    assert r.stdout.startswith(f"tiny_test: {target} (")
    assert publisher.requests == ["/ok/sam_tiny.pth"]
    # Converted once, by the real converter: the same params as converting the .pth by path.
    assert files_under(home) == ["tiny_test.safetensors"]  # the download is removed once converted
    meta = sam_jax.checkpoints.native.metadata(target)
    assert meta["source"].startswith(publisher.url("ok", "sam_tiny.pth"))
    model, params = sam_jax.load("tiny_test")
    assert model.config == tiny.model.config
    assert_same_params(params, tiny.params)
    # Later uses read the cache: no request, even with the publisher gone.
    publisher.shutdown()
    cache(url="http://127.0.0.1:9/sam_tiny.pth")
    assert sam_jax.load("tiny_test")[0].config == tiny.model.config
    assert publisher.requests == ["/ok/sam_tiny.pth"]
    r = run(capsys, "weights", "path", "tiny_test")
    assert (r.returncode, r.stdout.strip()) == (0, target)
    r = run(capsys, "weights", "list")
    assert r.returncode == 0 and f"cache: {home}" in r.stdout
    assert any(line.startswith("tiny_test") and target in line for line in r.stdout.splitlines())
    assert any(line.startswith("vit_h") and "not cached" in line for line in r.stdout.splitlines())


@pytest.mark.full  # compiles the tiny model in `segment`: ~10 s; the daily tier resolves names in-process
def test_segment_takes_a_name_for_weights(cache, tmp_path, capsys):
    from PIL import Image

    photo = str(tmp_path / "photo.png")
    Image.fromarray(np.full((40, 60, 3), 90, np.uint8)).save(photo)
    cache()
    r = run(
        capsys, "segment", photo, "--weights", "tiny_test", "--point", "30,20", "--out", str(tmp_path / "out"), "--json"
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["weights"] == "tiny_test"


@pytest.mark.parametrize(
    "mode, sha, expected",
    [
        ("truncated", None, "broke off before the end of the file"),
        ("ok", "0" * 64, "does not match its pinned sha256"),
        ("missing", None, "answered HTTP 404"),
        ("stall", None, f"stopped answering for {TIMEOUT:g} s"),
    ],
)
def test_a_failed_download_is_one_line_and_leaves_nothing(cache, publisher, mode, sha, expected, capsys):
    home = cache({"tiny_test": (mode, sha)})
    t0 = time.perf_counter()
    with pytest.raises(DownloadError, match=expected) as e:
        fetch("tiny_test", progress=False)
    # At most three tries, each given TIMEOUT seconds, whatever the server does.
    assert time.perf_counter() - t0 < 30
    assert "\n" not in str(e.value)
    assert files_under(home) == []  # no partial download, no converted file: nothing to mistake for weights
    if mode == "missing":  # the command line's report of the same error (404: no retries, fast)
        r = run(capsys, "weights", "fetch", "tiny_test")
        assert r.returncode == 1 and expected in one_error_line(r), r.stderr


def test_no_network_says_where_to_place_the_file_and_a_placed_file_is_checked(cache, pth_bytes, tiny):
    home = cache(url="http://127.0.0.1:9/sam_tiny.pth")  # port 9 (discard): nothing listens
    with pytest.raises(DownloadError) as e:
        sam_jax.load("tiny_test")
    where = str(home / "downloads" / "sam_tiny.pth")
    assert "cannot reach http://127.0.0.1:9/sam_tiny.pth" in str(e.value) and where in str(e.value)
    # The file placed by hand, as the message says: its hash is checked, then it converts.
    with open(where, "wb") as f:
        f.write(pth_bytes)
    model, params = sam_jax.load("tiny_test")
    assert_same_params(params, tiny.params)
    # A placed file that does not hash right is not converted (pooch would download it again).
    sam_jax.checkpoints.named.clear("tiny_test")
    with open(where, "wb") as f:
        f.write(pth_bytes[:-10])
    with pytest.raises(DownloadError, match="cannot reach"):
        sam_jax.load("tiny_test")
    assert not os.path.exists(home / "tiny_test.safetensors")


@pytest.mark.full  # two processes importing jax: ~7 s
def test_two_concurrent_fetches_download_once_and_both_load(cache, publisher):
    home = cache()
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sam_jax.cli", "weights", "fetch", "tiny_test"],
            env=dict(env, PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", "")),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert publisher.requests == ["/ok/sam_tiny.pth"]  # the second process waited, then found it
    assert files_under(home) == ["tiny_test.safetensors"]
    sam_jax.load("tiny_test")


def test_a_full_disk_while_converting_is_one_line_and_leaves_no_file(cache, monkeypatch):
    import errno

    import safetensors.numpy

    home = cache()

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.numpy, "save_file", full_disk)
    with pytest.raises(DownloadError, match=r"tiny_test: cannot write .*No space left on device"):
        fetch("tiny_test", progress=False)
    assert not any(f.endswith(".safetensors") for f in files_under(home))


def test_unknown_names_list_the_known_ones(cache, tmp_path, capsys):
    cache()
    with pytest.raises(FileNotFoundError, match="known names: tiny_test, vit_b, vit_h, vit_l"):
        sam_jax.load("vit_x")
    with pytest.raises(ValueError, match="unknown weights name 'vit_x'"):
        fetch("vit_x")
    # A path-like string is a path, never a name: a missing file is reported as one.
    with pytest.raises(FileNotFoundError, match="no such weights file or folder: missing/w.safetensors"):
        sam_jax.load("missing/w.safetensors")
    r = run(capsys, "weights", "fetch", "vit_x")
    assert r.returncode == 2 and r.stderr.startswith("sam-jax weights: error: unknown weights name 'vit_x'")
    photo = str(tmp_path / "p.png")
    from PIL import Image

    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
    r = run(capsys, "segment", photo, "--weights", "vit_x", "--point", "4,4", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "known names" in one_error_line(r, "sam-jax segment"), r.stderr


def test_clear_removes_only_sam_jax_files(cache, publisher, capsys):
    home = cache()
    fetch("tiny_test", progress=False)
    (home / "notes.txt").write_text("the user's own file")
    r = run(capsys, "weights", "clear")
    assert r.returncode == 0, r.stderr
    assert "removed" in r.stdout and "tiny_test.safetensors" in r.stdout
    assert files_under(home) == ["notes.txt"]
    r = run(capsys, "weights", "path", "tiny_test")
    assert r.returncode == 1 and "not cached" in r.stderr


def test_a_bad_registry_file_is_named(cache, tmp_path, monkeypatch):
    reg = tmp_path / "bad.json"
    reg.write_text('{"x": {"url": "http://h/x.pth", "sha256": "abc"}}')
    monkeypatch.setenv(named.REGISTRY_ENV, str(reg))
    with pytest.raises(ValueError, match="entry 'x' needs a 'url' and a 64-hex-digit 'sha256'"):
        sam_jax.load("x")


def _hf_cache(root, repo_id: str, params, config) -> str:
    """A Hugging Face cache holding REPO_ID at one revision, as huggingface_hub lays it out."""
    from sam_jax.checkpoints import export_hf

    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    export_hf(params, config, str(snapshot))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    return revision


@pytest.mark.full  # three processes importing jax and huggingface_hub: ~12 s
def test_a_hub_id_resolves_through_huggingface_hub_offline(cache, tmp_path, tiny):
    home = cache()
    hf_home = tmp_path / "hf"
    revision = _hf_cache(hf_home, "someone/sam-tiny-finetune", tiny.params, tiny.model.config)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    r = cli("weights", "fetch", "someone/sam-tiny-finetune", env=env)
    assert r.returncode == 0, r.stderr
    target = home / "hub" / "someone--sam-tiny-finetune.safetensors"
    assert str(target) in r.stdout
    assert sam_jax.checkpoints.native.metadata(str(target))["source"] == f"hf://someone/sam-tiny-finetune@{revision}"
    model, params = sam_jax.load("someone/sam-tiny-finetune")  # cached: this process never asks the Hub
    assert_same_params(params, tiny.params)
    r = cli("weights", "list", env=env)
    assert "someone/sam-tiny-finetune" in r.stdout
    # Not in the Hub cache, and offline: one line, exit 1.
    r = cli("weights", "fetch", "someone/other-model", env=env)
    assert r.returncode == 1 and "Hugging Face" in one_error_line(r), r.stderr
