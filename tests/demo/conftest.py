"""Fixtures of the demo's tests: the photo, the app on the tiny model in-process (Starlette's
TestClient), a real uvicorn server on 127.0.0.1, and headless Chromium driven by Playwright.

The browser is Debian's chromium (`.ci/run` installs it), launched by path: Playwright downloads
no browser. Without it (or without Playwright) the browser tests skip, except under CI=true,
where they fail: CI must run them.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sam_jax.demo import create_app, serving

PHOTO = np.ascontiguousarray(skimage.data.coffee())  # 400 x 600 RGB
H, W = PHOTO.shape[:2]


def encode(image: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    return buf.getvalue()


def decode_png(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


@pytest.fixture(scope="module")
def client(tiny):
    from starlette.testclient import TestClient

    with TestClient(create_app(tiny.model, tiny.params, cache_size=8, name="tiny")) as c:
        yield c


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """The app on a real uvicorn server, on a free port of 127.0.0.1, in a thread; yields its URL."""
    sock = serving.bind("127.0.0.1", 0)
    sock.listen()
    server = serving.server(app)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="demo test server")
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what}: CI runs the demo page's browser tests (.ci/run installs chromium)")
    pytest.skip(f"{what} (CI=true fails here instead)")


@pytest.fixture(scope="module")
def browser():
    path = shutil.which("chromium")
    if path is None:
        _missing("chromium is not installed (Debian: apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True)
        try:
            yield b
        finally:
            b.close()
