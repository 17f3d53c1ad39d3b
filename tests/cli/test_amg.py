"""`sam-jax amg`: folders with bad files, re-runs, atomic outputs, both output modes, usage errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sam_jax import cli
from sam_jax.amg import SamAutomaticMaskGenerator

pytest.importorskip("pycocotools")  # the default output mode

# Loose thresholds so the tiny model leaves masks (see test_amg_api).
FLAGS = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--box-nms-thresh", "1.0"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("amg_in")
    Image.fromarray(skimage.data.coffee()[::4, ::4]).save(d / "coffee.jpg")
    Image.fromarray(skimage.data.astronaut()[::4, ::4]).save(d / "astronaut.png")
    Image.fromarray(skimage.data.chelsea()[::3, ::3]).save(d / "chelsea.png")
    Image.fromarray(skimage.data.chelsea()[::3, ::3]).save(d / "chelsea.jpg")  # same stem
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "notes.txt").write_text("not an image")
    return d


def _run(capsys, *argv):
    rc = cli.main(["amg", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_folder_with_corrupt_files_then_rerun(tiny, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc, stdout, stderr = _run(capsys, folder, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS)
    assert rc == 1  # some inputs failed
    assert sorted(os.listdir(out)) == ["astronaut.json", "chelsea.jpg.json", "chelsea.png.json", "coffee.json"]
    assert "broken.jpg" in stderr and "notes.txt" in stderr
    summary = stdout.strip().splitlines()[-1]
    assert "4 written" in summary and "2 failed" in summary and "broken.jpg" in summary and "notes.txt" in summary
    # The JSON is the generator's COCO records for that image.
    records = json.loads((out / "astronaut.json").read_text())
    image = np.asarray(Image.open(folder / "astronaut.png").convert("RGB"))
    want = SamAutomaticMaskGenerator(
        tiny.model,
        tiny.params,
        points_per_side=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        box_nms_thresh=1.0,
        output_mode="coco_rle",
    ).generate(image)
    assert len(records) == len(want) > 0
    for a, b in zip(records, want):
        assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"] and a["area"] == b["area"]
    assert not [f for f in os.listdir(out) if f.startswith(".")]  # no temporary files left
    assert (os.stat(out / "coffee.json").st_mode & 0o777) == 0o666 & ~_umask()

    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    rc, stdout, _ = _run(capsys, folder, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS)
    assert rc == 1 and "0 written" in stdout and "4 already done" in stdout
    assert before == {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    rc, stdout, _ = _run(
        capsys, folder / "coffee.jpg", "--weights", tiny.weights, "--out", out, "--overwrite", "--no-progress", *FLAGS
    )
    assert rc == 0 and "1 written" in stdout
    assert os.stat(out / "coffee.json").st_mtime_ns != before["coffee.json"]


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_binary_mask_folder_matches_official_layout(tiny, folder, tmp_path, capsys):
    out = tmp_path / "out"
    rc, _, _ = _run(
        capsys,
        folder / "astronaut.png",
        "--weights",
        tiny.weights,
        "--out",
        out,
        "--output-mode",
        "binary_mask",
        "--no-progress",
        *FLAGS,
    )
    assert rc == 0
    image = np.asarray(Image.open(folder / "astronaut.png").convert("RGB"))
    want = SamAutomaticMaskGenerator(
        tiny.model, tiny.params, points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0
    ).generate(image)
    files = sorted(os.listdir(out / "astronaut"))
    assert files == sorted([f"{i}.png" for i in range(len(want))] + ["metadata.csv"])
    lines = (out / "astronaut" / "metadata.csv").read_text().split("\n")
    assert lines[0] == (
        "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
        "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
    )
    for i, (line, r) in enumerate(zip(lines[1:], want)):
        png = np.asarray(Image.open(out / "astronaut" / f"{i}.png"))
        np.testing.assert_array_equal(png, r["segmentation"].astype(np.uint8) * 255)
        fields = line.split(",")
        assert fields[:6] == [str(i), str(r["area"]), *map(str, r["bbox"])]
        assert fields[-4:] == [str(v) for v in r["crop_box"]]
    assert len(lines) == len(want) + 1


def test_interrupted_write_leaves_nothing(tiny, folder, tmp_path, capsys, monkeypatch):
    """A crash (here Ctrl-C) while writing leaves neither a half JSON nor a temporary file."""
    out = tmp_path / "out"

    def broken_dump(obj, f, **kw):
        f.write('[{"segmentation": ')
        raise KeyboardInterrupt

    monkeypatch.setattr(json, "dump", broken_dump)
    with pytest.raises(KeyboardInterrupt):
        cli.main(
            ["amg", str(folder / "coffee.jpg"), "--weights", tiny.weights, "--out", str(out), "--no-progress", *FLAGS]
        )
    assert os.listdir(out) == []


def test_an_image_the_model_cannot_take_fails_alone(tiny, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(skimage.data.coffee()[::4, ::4]).save(d / "ok.png")
    Image.fromarray(np.zeros((1, 900, 3), np.uint8)).save(d / "sliver.png")  # resizes to 0 rows
    rc, stdout, stderr = _run(capsys, d, "--weights", tiny.weights, "--out", tmp_path / "out", "--no-progress", *FLAGS)
    assert rc == 1 and "sliver.png" in stderr and "1 written" in stdout
    assert os.listdir(tmp_path / "out") == ["ok.json"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        ([], "required"),
        (["IN", "--out", "O"], "--weights"),
        (["IN", "--weights", "W", "--out", "O", "--points-per-side", "0"], "points_per_side"),
        (["IN", "--weights", "W", "--out", "O", "--box-nms-thresh", "x"], "box-nms-thresh"),
        (["IN", "--weights", "W", "--out", "O", "--output-mode", "rle"], "output-mode"),
        (["/no/such/dir", "--weights", "W", "--out", "O"], "no such image or folder"),
        (["IMG", "--weights", "/no/such.safetensors", "--out", "O"], "no such weights file"),
    ],
)
def test_usage_errors_one_line_exit_2(folder, tmp_path, capsys, argv, needle):
    argv = [
        str(folder / "coffee.jpg")
        if a == "IMG"
        else str(folder)
        if a == "IN"
        else str(tmp_path / "o")
        if a == "O"
        else a
        for a in argv
    ]
    rc, stdout, stderr = _run(capsys, *argv)
    assert rc == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("sam-jax amg: error:") and needle in stderr
