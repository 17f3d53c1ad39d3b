"""`sam-jax amg --distributed` in two real processes, over a folder whose names collide without
their extensions: every output is written exactly once, by the one process whose share holds its
image, and a re-run after a file is added (shifting every share) computes that file alone."""

from __future__ import annotations

import json
import os

import pytest
import skimage.data
from PIL import Image

from tests.amg.test_multidevice import amg_two_processes

pytest.importorskip("pycocotools")  # the default output mode

# (height, width): distinct, so each output shows which image it was made from (COCO RLE records
# carry the image size); small, so the full-resolution steps cost little.
SIZES = {"a.jpg": (40, 56), "a.png": (56, 40), "b.jpg": (48, 60), "b.png": (60, 48), "c.png": (44, 52)}
NEW = {"0.png": (52, 44)}  # sorts first: every file changes process on the re-run
# Loose thresholds so the tiny model leaves masks; the smallest grid.
FLAGS = ["--points-per-side", "2", "--points-per-batch", "4", "--pred-iou-thresh", "0"]
FLAGS += ["--stability-score-thresh", "0", "--box-nms-thresh", "1.0", "--no-progress"]


def _photos(folder, sizes):
    for name, (h, w) in sizes.items():
        Image.fromarray(skimage.data.coffee()[:h, :w]).save(folder / name)


def _amg_two_processes(src, out, weights):
    """Both processes' summary lines (process 0's first)."""
    outs = amg_two_processes([str(src), "--out", str(out), "--weights", weights, *FLAGS], n_devices=1, timeout=600)
    return [stdout.strip().splitlines()[-1] for stdout, _ in outs]


def _outputs(out):
    """Every entry of `out` (hidden ones too) -> the image sizes its records describe."""
    return {f: {tuple(r["segmentation"]["size"]) for r in json.loads((out / f).read_text())} for f in os.listdir(out)}


@pytest.mark.full  # four fresh JAX processes (two runs of two), each compiling the pipeline: ~40 CPU-s
def test_two_processes_write_every_output_once_and_rerun_only_a_new_file(tiny, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _photos(src, SIZES)
    said = _amg_two_processes(src, out, tiny.weights)
    # Sorted: a.jpg a.png b.jpg b.png c.png; each process takes every 2nd, so a.jpg and a.png (and
    # b.jpg and b.png) are written by different processes.
    assert said[0].startswith("3 images (process 0 of 2): 3 written, 0 already done")  # a.jpg b.jpg c.png
    assert said[1].startswith("2 images (process 1 of 2): 2 written, 0 already done")  # a.png b.png
    # 5 writes in all, 5 outputs, each describing its own image: every output written exactly once.
    assert _outputs(out) == {f"{n}.json": {hw} for n, hw in SIZES.items()}
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}

    _photos(src, NEW)
    said = _amg_two_processes(src, out, tiny.weights)
    assert said[0].startswith("3 images (process 0 of 2): 1 written, 2 already done")  # 0.png a.png b.png
    assert said[1].startswith("3 images (process 1 of 2): 0 written, 3 already done")  # a.jpg b.jpg c.png
    assert _outputs(out) == {f"{n}.json": {hw} for n, hw in {**SIZES, **NEW}.items()}
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before
