"""`sam-jax amg`: folders with bad files, re-runs, atomic outputs, output names, what a killed run
leaves, both output modes, usage errors."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from sam_jax import cli
from sam_jax._atomic import _temporary, atomic_file, atomic_folder
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
    assert sorted(os.listdir(out)) == ["astronaut.png.json", "chelsea.jpg.json", "chelsea.png.json", "coffee.jpg.json"]
    assert "broken.jpg" in stderr and "notes.txt" in stderr
    summary = stdout.strip().splitlines()[-1]
    assert "4 written" in summary and "2 failed" in summary and "broken.jpg" in summary and "notes.txt" in summary
    # The JSON is the generator's COCO records for that image.
    records = json.loads((out / "astronaut.png.json").read_text())
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
    assert (os.stat(out / "coffee.jpg.json").st_mode & 0o777) == 0o666 & ~_umask()

    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    rc, stdout, _ = _run(capsys, folder, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS)
    assert rc == 1 and "0 written" in stdout and "4 already done" in stdout
    assert before == {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    rc, stdout, _ = _run(
        capsys, folder / "coffee.jpg", "--weights", tiny.weights, "--out", out, "--overwrite", "--no-progress", *FLAGS
    )
    assert rc == 0 and "1 written" in stdout
    assert os.stat(out / "coffee.jpg.json").st_mtime_ns != before["coffee.jpg.json"]


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
    files = sorted(os.listdir(out / "astronaut.png"))
    assert files == sorted([f"{i}.png" for i in range(len(want))] + ["metadata.csv"])
    lines = (out / "astronaut.png" / "metadata.csv").read_text().split("\n")
    assert lines[0] == (
        "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
        "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
    )
    for i, (line, r) in enumerate(zip(lines[1:], want)):
        png = np.asarray(Image.open(out / "astronaut.png" / f"{i}.png"))
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
    assert os.listdir(tmp_path / "out") == ["ok.png.json"]


# (height, width) of each photo: distinct, so an output shows which image it was made from (COCO
# RLE records carry the image size), and all in the padded shape of coffee()[::4, ::4] above, so
# these tests reuse its compiled programs.
SIZES = {"a.jpg": (100, 150), "a.png": (99, 149), "0.png": (98, 148)}


def _photos(folder, names):
    for n in names:
        h, w = SIZES[n]
        Image.fromarray(skimage.data.coffee()[::4, ::4][:h, :w]).save(folder / n)


def _sizes(out):
    """Output file -> the image sizes its records describe."""
    return {f: {tuple(r["segmentation"]["size"]) for r in json.loads((out / f).read_text())} for f in os.listdir(out)}


def _as_process(monkeypatch, index, count):
    """Makes --distributed take process `index` of `count`'s share, without a cluster."""
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: None)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(jax, "process_count", lambda: count)


def test_output_names_do_not_depend_on_the_share_or_the_folder(tiny, tmp_path, capsys, monkeypatch):
    """With two processes, each takes every 2nd file: a.jpg and a.png land on different ones, and
    each output is still named by the whole file name, so both are kept. A re-run with one process,
    after a file was added that sorts first, finds the same names and computes the new file alone.
    (The shares run here in one process; test_amg_distributed runs two real ones.)"""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _photos(src, ["a.jpg", "a.png"])
    argv = [src, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS]
    for i in range(2):
        _as_process(monkeypatch, i, 2)
        rc, stdout, _ = _run(capsys, *argv, "--distributed")
        assert rc == 0 and stdout.startswith(f"1 images (process {i} of 2): 1 written")
    assert _sizes(out) == {"a.jpg.json": {SIZES["a.jpg"]}, "a.png.json": {SIZES["a.png"]}}
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out)}
    _photos(src, ["0.png"])
    rc, stdout, _ = _run(capsys, *argv)
    assert rc == 0 and stdout.startswith("3 images: 1 written, 2 already done")
    assert _sizes(out) == {f"{n}.json": {SIZES[n]} for n in ["0.png", "a.jpg", "a.png"]}
    assert {f: os.stat(out / f).st_mtime_ns for f in before} == before


def test_outputs_named_the_old_way_are_left_alone(tiny, tmp_path, capsys):
    """Earlier versions wrote a.json for a.png: it stays as it was, and a note says why a.png is
    done again (as a.png.json)."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _photos(src, ["a.png"])
    (out / "a.json").write_text("[]")
    rc, stdout, stderr = _run(capsys, src, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS)
    assert rc == 0 and "1 written" in stdout
    assert "note: 1 image(s) have an output under the name earlier versions gave it" in stderr
    assert str(out / "a.json") in stderr and str(out / "a.png.json") in stderr
    assert sorted(os.listdir(out)) == ["a.json", "a.png.json"] and (out / "a.json").read_text() == "[]"


def test_a_rerun_removes_what_a_killed_run_left_for_its_own_outputs(tiny, tmp_path, capsys):
    """A writer killed mid-write (SIGKILL runs no clean-up) leaves its temporary; the next run that
    writes that output removes it. The temporaries of outputs it does not write (another process's,
    live or not) and anonymous ones of earlier versions stay."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    _photos(src, ["a.png"])
    killed = atomic_file(out / "a.png.json")
    stale = killed.__enter__()  # entered and never left: what a killed writer leaves
    with open(stale, "w") as f:
        f.write('[{"segmentation": ')
    other = atomic_file(out / "b.png.json")
    others = [os.path.basename(other.__enter__()), ".tmp-1a2b3c4d.json"]
    (out / ".tmp-1a2b3c4d.json").write_text("")
    rc, stdout, stderr = _run(capsys, src, "--weights", tiny.weights, "--out", out, "--no-progress", *FLAGS)
    assert rc == 0 and "1 written" in stdout
    assert f"removed 1 temporaries that an interrupted run left: {stale}" in stderr
    assert sorted(os.listdir(out)) == sorted(["a.png.json", *others])
    assert {tuple(r["segmentation"]["size"]) for r in json.loads((out / "a.png.json").read_text())} == {SIZES["a.png"]}


def test_binary_mask_rerun_cleans_up_and_never_replaces_a_file(tiny, tmp_path, capsys):
    """An --overwrite run killed while replacing a.png's folder leaves the new one half written and
    the old one moved aside: the next run removes both and keeps a.png's output, done before. A
    file where a.jpg's output folder goes is reported and left alone, not replaced."""
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    _photos(src, ["a.jpg", "a.png"])
    (out / "a.png").mkdir(parents=True)
    (out / "a.png" / "metadata.csv").write_text("id")
    killed = atomic_folder(out / "a.png")
    half = killed.__enter__()  # entered and never left: what a killed writer leaves
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(os.path.join(half, "0.png"))
    aside = _temporary(str(out / "a.png"), "old", folder=True)  # atomic_folder's name for the folder it replaces
    os.mkdir(os.path.join(aside, "x"))
    (out / "a.jpg").write_bytes(b"someone's file")
    argv = [src, "--weights", tiny.weights, "--out", out, "--output-mode", "binary_mask", "--no-progress", *FLAGS]
    rc, stdout, stderr = _run(capsys, *argv)
    assert rc == 1
    summary = stdout.strip().splitlines()[-1]
    assert "0 written, 1 already done" in summary and "1 failed: " + str(src / "a.jpg") in summary
    assert f"{out / 'a.jpg'} exists and is not a folder: not replaced" in stderr
    assert f"removed 2 temporaries that an interrupted run left: {', '.join(sorted([half, aside]))}" in stderr
    assert sorted(os.listdir(out)) == ["a.jpg", "a.png"]
    assert os.listdir(out / "a.png") == ["metadata.csv"] and (out / "a.jpg").read_bytes() == b"someone's file"


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
        (["IN", "--weights", "W", "--out", "IN", "--output-mode", "binary_mask"], "is the images' own folder"),
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


@pytest.mark.full  # ~15 CPU-s: SAM-HQ's generator programs compiled, two generators and the CLI's
def test_hq_token_only(tiny_hq, folder, tmp_path, capsys):
    """--hq-token-only reaches the generator: the masks are SAM-HQ's HQ masks alone, as
    `SamAutomaticMaskGenerator(hq_token_only=True)` gives them, not its default ones."""
    out = tmp_path / "out"
    argv = [folder / "astronaut.png", "--weights", tiny_hq.weights, "--out", out, "--output-mode", "binary_mask"]
    rc, _, _ = _run(capsys, *argv, "--hq-token-only", "--no-progress", *FLAGS)
    assert rc == 0
    image = np.asarray(Image.open(folder / "astronaut.png").convert("RGB"))
    options = dict(points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)
    want = SamAutomaticMaskGenerator(tiny_hq.model, tiny_hq.params, hq_token_only=True, **options).generate(image)
    default = SamAutomaticMaskGenerator(tiny_hq.model, tiny_hq.params, **options).generate(image)
    got = [np.asarray(Image.open(out / "astronaut.png" / f"{i}.png")) > 0 for i in range(len(want))]
    assert want and len(os.listdir(out / "astronaut.png")) == len(want) + 1  # + metadata.csv
    for g, r in zip(got, want):
        np.testing.assert_array_equal(g, r["segmentation"])
    assert [r["area"] for r in want] != [r["area"] for r in default]


def test_hq_token_only_needs_sam_hq_weights(tiny, folder, tmp_path, capsys):
    rc, stdout, stderr = _run(
        capsys, folder / "coffee.jpg", "--weights", tiny.weights, "--out", tmp_path / "o", "--hq-token-only"
    )
    assert rc == 2 and stdout == "" and len(stderr.strip().splitlines()) == 1
    assert stderr.startswith("sam-jax amg: error: --hq-token-only needs SAM-HQ weights")
    with pytest.raises(ValueError, match="hq_token_only=True needs a SAM-HQ model"):
        SamAutomaticMaskGenerator(tiny.model, tiny.params, hq_token_only=True)
    with pytest.raises(TypeError, match="hq_token_only must be True or False"):
        SamAutomaticMaskGenerator(tiny.model, tiny.params, hq_token_only=1)
