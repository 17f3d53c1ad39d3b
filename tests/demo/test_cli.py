"""`sam-jax demo` on the command line: one-line errors before anything loads, the address line,
a real server in a subprocess that answers and stops on Ctrl+C."""

from __future__ import annotations

import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from sam_jax.cli import main as cli_main
from sam_jax.demo.serving import address_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--weights", "vit_x", "--port", "0"], "no such weights file or folder: vit_x (known names: vit_b"),
        (["--port", "70000"], "--port 70000: expected a port number from 0 to 65535"),
        (["--port", "-1"], "expected a port number from 0 to 65535"),
        (["--port", "http"], "argument --port: invalid int value: 'http'"),
        (["--cache", "0"], "--cache 0: keep at least one image"),
        (["--host", "no such host"], "--host no such host: not an address of this machine"),
        (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    ],
)
def test_usage_errors(capsys, args, message):
    weights = [] if "--weights" in args else ["--weights", "missing.safetensors"]
    assert cli_main(["demo", *weights, *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("sam-jax demo: error: ") and message in err, err


def test_weights_that_do_not_load(capsys, tmp_path):
    assert cli_main(["demo", "--weights", str(tmp_path / "none.safetensors"), "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("sam-jax demo: error: no such weights file or folder:")


def test_port_in_use_is_said_before_loading(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        # The weights do not exist: the port is checked first.
        assert cli_main(["demo", "--weights", "missing.safetensors", "--port", str(port)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"sam-jax demo: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_address_not_of_this_machine(capsys):
    # 192.0.2.1 is reserved for documentation (RFC 5737): no interface has it; nothing is sent.
    assert cli_main(["demo", "--weights", "missing.safetensors", "--host", "192.0.2.1", "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("sam-jax demo: error: cannot listen on 192.0.2.1:0: ") and err.count("\n") == 1


def test_address_line():
    line = address_line("sam-jax demo", "vit_b", ("127.0.0.1", 8000))
    assert line == "sam-jax demo: serving vit_b on http://127.0.0.1:8000 (Ctrl+C to stop)"
    line = address_line("sam-jax demo", "vit_b", ("::1", 8000, 0, 0))
    assert line == "sam-jax demo: serving vit_b on http://[::1]:8000 (Ctrl+C to stop)"
    line = address_line("sam-jax demo", "vit_h", ("0.0.0.0", 80))
    assert line == (
        "sam-jax demo: serving vit_h on http://127.0.0.1:80 - listening on ALL network interfaces (0.0.0.0): "
        "other machines can use it (Ctrl+C to stop)"
    )
    line = address_line("sam-jax demo", "m", ("::", 80, 0, 0))
    assert "http://[::1]:80 - listening on ALL network interfaces (::)" in line
    line = address_line("sam-jax demo", "m", ("192.0.2.7", 80))
    assert (
        line == "sam-jax demo: serving m on http://192.0.2.7:80 - listening on 192.0.2.7, reachable from other "
        "machines (Ctrl+C to stop)"
    )


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            return proc.stdout.readline()
        if proc.poll() is not None:
            break
    return ""


@pytest.mark.full  # ~8 s: a fresh process loading the model; the daily tier serves the same app in-process
def test_serves_and_stops_on_ctrl_c(tiny):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "sam_jax.cli", "demo", "--weights", tiny.weights, "--port", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = _read_line(proc, timeout=300)
        m = re.fullmatch(r"sam-jax demo: serving (.+) on http://127\.0\.0\.1:(\d+) \(Ctrl\+C to stop\)\n", line)
        assert m and m[1] == tiny.weights, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = f"http://127.0.0.1:{m[2]}"
        with urllib.request.urlopen(url + "/", timeout=30) as r:
            assert r.status == 200 and b'id="canvas"' in r.read()
        with urllib.request.urlopen(url + "/api/info", timeout=30) as r:
            assert json.load(r)["model"] == tiny.weights
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0 and out == "" and err == "", (proc.returncode, out, err)
