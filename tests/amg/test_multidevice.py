"""Several devices and several processes give exactly the single-device results.

Runs in subprocesses: `XLA_FLAGS=--xla_force_host_platform_device_count=N` must be set before
JAX starts. Each job (one crop of one image) runs alone on one device in every configuration, so
the results are expected to be EQUAL, not merely close.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import skimage.data
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import json, sys
import jax, skimage.data
import sam_jax
from sam_jax.amg import SamAutomaticMaskGenerator
model, params = sam_jax.load(sys.argv[1])
images = [skimage.data.coffee()[::3, ::3], skimage.data.astronaut()[::4, ::4], skimage.data.camera()[::4, ::3]]
gen = SamAutomaticMaskGenerator(model, params, output_mode="uncompressed_rle", points_per_side=5,
                                pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0,
                                crop_n_layers=1, crop_nms_thresh=1.0, crop_overlap_ratio=0.9)
print(json.dumps({"devices": len(gen.devices), "records": gen.generate_batch(images)}))
"""


def _env(n_devices: int) -> dict:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}").strip()
    return env


def _generate(weights: str, n_devices: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, weights], env=_env(n_devices), capture_output=True, text=True, timeout=1200
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.full  # fresh JAX processes, each compiling the pipeline (~35 CPU-s)
def test_four_devices_equal_one_device(tiny):
    """3 images with one crop layer on 4 devices: layer 0 runs as one group padded with a copy
    (its results dropped), layer 1 as 3 groups of 4 crops; mixed sizes share padded shapes."""
    four = _generate(tiny.weights, 4)
    one = _generate(tiny.weights, 1)
    assert four["devices"] == 4 and one["devices"] == 1
    assert [len(r) for r in four["records"]] == [len(r) for r in one["records"]]
    assert sum(len(r) for r in one["records"]) > 50
    assert four["records"] == one["records"]  # bit-for-bit: same per-device programs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def amg_two_processes(args, n_devices: int, timeout: float) -> list:
    """`sam-jax amg ARGS --distributed` as processes 0 and 1 of one job on this machine, each with
    N_DEVICES host devices; asserts both succeed and returns their (stdout, stderr)."""
    port = _free_port()
    distributed = ["--distributed", "--coordinator-address", f"localhost:{port}", "--num-processes", "2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sam_jax.cli", "amg", *args, *distributed, "--process-id", str(i)],
            env=_env(n_devices),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (_, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    return outs


@pytest.mark.full  # fresh JAX processes, each compiling the pipeline (~40 CPU-s)
def test_cli_two_processes_share_the_files(tiny, tmp_path):
    pytest.importorskip("pycocotools")
    src = tmp_path / "in"
    src.mkdir()
    photos = [
        skimage.data.coffee()[::4, ::4],
        skimage.data.astronaut()[::4, ::4],
        skimage.data.chelsea()[::3, ::3],
        skimage.data.rocket()[::4, ::4],
        skimage.data.camera()[::4, ::4],
    ]
    for i, p in enumerate(photos):
        Image.fromarray(p).save(src / f"{i}.png")
    flags = [
        "--weights",
        tiny.weights,
        "--points-per-side",
        "4",
        "--pred-iou-thresh",
        "0",
        "--stability-score-thresh",
        "0",
        "--box-nms-thresh",
        "1",
        "--no-progress",
    ]
    outs = amg_two_processes([str(src), "--out", str(tmp_path / "multi"), *flags], n_devices=2, timeout=1200)
    assert "3 written" in outs[0][0] and "process 0 of 2" in outs[0][0]  # files 0, 2, 4
    assert "2 written" in outs[1][0] and "process 1 of 2" in outs[1][0]  # files 1, 3
    single = subprocess.run(
        [sys.executable, "-m", "sam_jax.cli", "amg", str(src), "--out", str(tmp_path / "single"), *flags],
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    names = sorted(os.listdir(tmp_path / "single"))
    assert names == sorted(os.listdir(tmp_path / "multi")) == [f"{i}.png.json" for i in range(5)]
    for n in names:
        assert (tmp_path / "multi" / n).read_text() == (tmp_path / "single" / n).read_text()
