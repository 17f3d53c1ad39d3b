"""`sam-jax segment` end to end with a tiny converted checkpoint (the `tiny` fixture's file)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sam_jax import SamPredictor
from sam_jax.cli import main as cli_main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHOTO = np.ascontiguousarray(skimage.data.chelsea()[::2, ::2])  # 150 x 226
H, W = PHOTO.shape[:2]


def sam_jax_cmd():
    exe = shutil.which("sam-jax")
    return [exe] if exe else [sys.executable, "-m", "sam_jax.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([*sam_jax_cmd(), "segment", *args], capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def photo_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("img") / "cat.png")
    Image.fromarray(PHOTO).save(path)
    return path


def test_points_round_trip(tiny, photo_path, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        photo_path, "--weights", tiny.weights, "--point", "100,60", "--point", "20,130:0", "--out", str(out), "--json"
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["size"] == [H, W] and len(report["prompts"]) == 1
    entry = report["prompts"][0]
    assert entry["points"] == [[100.0, 60.0, 1], [20.0, 130.0, 0]] and entry["box"] is None
    pred = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    pred.set_image(PHOTO)
    masks, scores, _ = pred.predict([[100, 60], [20, 130]], [1, 0])
    logits = pred.predict([[100, 60], [20, 130]], [1, 0], return_logits=True)[0]
    assert [m["file"] for m in entry["masks"]] == [str(out / f"mask_0_{k}.png") for k in range(3)]
    for k, m in enumerate(entry["masks"]):
        png = np.asarray(Image.open(m["file"]))
        assert png.shape == (H, W) and set(np.unique(png)) <= {0, 255}
        conf = np.abs(logits[k]) > 1e-3  # another process, same model: equal but for rounding noise
        assert np.array_equal((png > 0)[conf], masks[k][conf])
        assert m["score"] == pytest.approx(float(scores[k]), abs=1e-5)  # scores O(1); float32 noise ~1e-7
        assert m["area"] == int((png > 0).sum())
    assert entry["best"] == int(np.argmax([m["score"] for m in entry["masks"]]))
    overlay = Image.open(report["overlay"])
    assert overlay.size == (W, H) and overlay.mode == "RGB"
    assert not np.array_equal(np.asarray(overlay), PHOTO)  # something was drawn


@pytest.mark.full  # ~9 CPU-s: a fresh process; the daily tier runs the CLI once (points)
def test_boxes_single_text_output(tiny, photo_path, tmp_path):
    out = tmp_path / "out"
    r = run_cli(
        photo_path,
        "--weights",
        tiny.weights,
        "--box",
        "10,10,120,100",
        "--box",
        "50,20,220,140",
        "--single",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("prompt 0 mask 0: score ") and lines[1].startswith("prompt 1 mask 0: score ")
    assert lines[-1] == f"overlay: {out / 'overlay.png'}"
    assert sorted(os.listdir(out)) == ["mask_0_0.png", "mask_1_0.png", "overlay.png"]


@pytest.mark.full  # ~9 CPU-s: a fresh process; the daily tier runs the CLI once (points)
def test_exif_orientation_applied(tiny, tmp_path):
    """A JPEG stored landscape with orientation 6 (rotate 90 degrees clockwise) is a portrait."""
    path = str(tmp_path / "rotated.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(PHOTO).save(path, exif=exif)
    # (20, 200) is inside the displayed W x H = 150 x 226 portrait, outside the stored landscape.
    r = run_cli(path, "--weights", tiny.weights, "--point", "20,200", "--out", str(tmp_path / "o"), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["size"] == [W, H]


def test_usage_error_is_one_line_without_traceback(tiny, photo_path, tmp_path):
    r = run_cli(photo_path, "--weights", tiny.weights, "--point", "1000,10", "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("sam-jax segment: error: ")
    assert "outside" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


USAGE_ERRORS = {
    "no_prompt": ([], "at least one --point or --box"),
    "point_three_numbers": (["--point", "1,2,3"], "2 comma-separated numbers"),
    "point_not_a_number": (["--point", "a,b"], "2 comma-separated numbers"),
    "point_label_2": (["--point", "1,2:2"], "label"),
    "point_nan": (["--point", "nan,2"], "2 comma-separated numbers"),
    "box_three_numbers": (["--box", "1,2,3"], "4 comma-separated numbers"),
    "box_flipped": (["--box", "50,5,10,20"], "x1 < x0"),
    "box_outside": (["--box", "0,0,10,1000"], "outside"),
    "points_with_two_boxes": (["--point", "5,5", "--box", "1,1,9,9", "--box", "2,2,8,8"], "at most one --box"),
    "unknown_flag": (["--point", "5,5", "--colour", "red"], "unrecognized arguments"),
    "missing_out": (["--point", "5,5", "--no-out"], "--out"),
    # argparse took "-5,3" for an option ("expected one argument"): negative values reach the check.
    "point_negative": (["--point", "-5,3"], "--point -5,3 is outside the 226x150"),
    "point_negative_fraction": (["--point", "-.5,3:0"], "--point -0.5,3 is outside"),
    "box_negative": (["--box", "-5,-3,10,10"], "--box -5,-3,10,10 is outside"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_error(case, tiny, photo_path, tmp_path, capsys):
    extra, match = USAGE_ERRORS[case]
    args = ["segment", photo_path, "--weights", tiny.weights, *extra]
    if case != "missing_out":
        args += ["--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sam-jax segment: error: ") and match in err


def test_missing_image(tiny, tmp_path, capsys):
    assert (
        cli_main(
            [
                "segment",
                str(tmp_path / "nope.png"),
                "--weights",
                tiny.weights,
                "--point",
                "1,1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    assert "no such image" in capsys.readouterr().err


def test_not_an_image(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("not a picture")
    assert (
        cli_main(["segment", str(bad), "--weights", tiny.weights, "--point", "1,1", "--out", str(tmp_path / "o")]) == 2
    )
    assert "cannot read image" in capsys.readouterr().err


def test_bad_weights_file(photo_path, tmp_path, capsys):
    bad = tmp_path / "w.safetensors"
    bad.write_bytes(b"\x00" * 64)
    assert cli_main(["segment", photo_path, "--weights", str(bad), "--point", "1,1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "safetensors" in err


def test_out_is_a_file(tiny, photo_path, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert cli_main(["segment", photo_path, "--weights", tiny.weights, "--point", "1,1", "--out", str(f)]) == 2
    assert "not a folder" in capsys.readouterr().err


# --- files and prompts as users have them (issue 31) ---

GRAY = PHOTO[..., 1]


def segment(tiny, image, out, *prompts: str) -> int:
    return cli_main(["segment", str(image), "--weights", tiny.weights, *prompts, "--out", str(out), "--json"])


def one_line_error(capsys, exit_status: int, rc: int) -> str:
    captured = capsys.readouterr()
    assert rc == exit_status and captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("sam-jax segment: error: ")
    return captured.err


@pytest.mark.parametrize("kind", ["png_16_bit", "tiff_float"])
def test_16_bit_and_float_files_segment_the_picture_they_show(kind, tiny, tmp_path, capsys):
    """Pillow's convert("RGB") clipped these to a white (16-bit) or black (float) picture, exit 0.
    The overlay shows the picture that was segmented: away from the tinted mask, the drawn point
    and the scores' box, it is the photo's gray."""
    if kind == "png_16_bit":
        path = tmp_path / "scan.png"
        Image.fromarray(GRAY.astype(np.uint16) * 257).save(path)  # 0..65535: 257 * g shows as g
    else:
        path = tmp_path / "scan.tif"
        Image.fromarray((GRAY / 255.0).astype(np.float32)).save(path)  # 0..1: g / 255 shows as g
    assert segment(tiny, path, tmp_path / "o", "--point", "100,60") == 0
    report = json.loads(capsys.readouterr().out)
    entry = report["prompts"][0]
    best = np.asarray(Image.open(entry["masks"][entry["best"]]["file"])) > 0
    plain = ~best
    plain[:40] = False  # the scores' box
    plain[50:71, 90:111] = False  # the point
    assert plain.sum() > H * W // 4
    overlay = np.asarray(Image.open(report["overlay"]))
    np.testing.assert_array_equal(overlay[plain], np.repeat(GRAY[plain][:, None], 3, axis=1))


def test_float_file_outside_0_1_is_refused(tiny, tmp_path, capsys):
    path = tmp_path / "depth.tif"
    Image.fromarray(np.linspace(0, 300, H * W, dtype=np.float32).reshape(H, W)).save(path)
    err = one_line_error(capsys, 2, segment(tiny, path, tmp_path / "o", "--point", "10,10"))
    assert f"cannot read image {path}" in err and "[0, 1]" in err and "[0, 300]" in err


def test_decompression_bomb_limit(tiny, photo_path, tmp_path, capsys, monkeypatch):
    """Pillow's limit on pixels (here lowered to fit the photo): above twice it, Pillow refuses and the
    CLI says so in one line; between once and twice it, Pillow warns and the photo is read, quietly."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", (H * W) // 2 - 1)  # H * W > twice the limit
    err = one_line_error(capsys, 2, segment(tiny, photo_path, tmp_path / "o", "--point", "10,10"))
    assert "decompression bomb" in err and not (tmp_path / "o").exists()
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", H * W - 1)  # over the limit, not twice over
    assert segment(tiny, photo_path, tmp_path / "o", "--point", "10,10") == 0
    assert json.loads(capsys.readouterr().out)["size"] == [H, W]


def test_rerun_removes_the_masks_of_a_run_with_more_prompts(tiny, photo_path, tmp_path, capsys):
    """The folder of a two-prompt run (mask_1_*.png beside mask_0_*.png; made by copying, where
    such a run would compile another decoder program), then a one-prompt run: only its own masks
    remain, with the user's files."""
    out = tmp_path / "o"
    assert segment(tiny, photo_path, out, "--point", "100,60") == 0
    for k in range(3):
        shutil.copy(out / f"mask_0_{k}.png", out / f"mask_1_{k}.png")
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert segment(tiny, photo_path, out, "--point", "20,130") == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(out)) == ["mask_0_0.png", "mask_0_1.png", "mask_0_2.png", "notes.txt", "overlay.png"]
    for m in report["prompts"][0]["masks"]:
        assert int((np.asarray(Image.open(m["file"])) > 0).sum()) == m["area"]  # this run's masks


@pytest.mark.full  # ~3 CPU-s: --single compiles its own decoder program
def test_rerun_leaves_exactly_its_own_outputs(tiny, photo_path, tmp_path, capsys):
    """Three masks, then one (--single) into the same folder: the first run's other masks are
    removed, the user's files are not; a run that fails removes nothing."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "mask_best.png").write_bytes(b"mine too")  # not a name segment writes
    assert segment(tiny, photo_path, out, "--point", "100,60") == 0
    assert sorted(os.listdir(out))[:3] == ["mask_0_0.png", "mask_0_1.png", "mask_0_2.png"]
    capsys.readouterr()
    assert segment(tiny, photo_path, out, "--point", "100,60", "--single") == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(os.listdir(out)) == ["mask_0_0.png", "mask_best.png", "notes.txt", "overlay.png"]
    assert int((np.asarray(Image.open(out / "mask_0_0.png")) > 0).sum()) == report["prompts"][0]["masks"][0]["area"]
    one_line_error(capsys, 2, segment(tiny, photo_path, out, "--point", "1000,60"))
    assert sorted(os.listdir(out)) == ["mask_0_0.png", "mask_best.png", "notes.txt", "overlay.png"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "mask_best.png").read_bytes() == b"mine too"


def test_thin_images(tiny, tmp_path, capsys):
    """1x2000 shrinks to no row at the tiny model's 160 (a traceback, before): refused in one line;
    13x2000 shrinks to one row (as 1x2000 does at vit_b's 1024) and is segmented."""
    thin = tmp_path / "thin.png"
    Image.fromarray(np.full((1, 2000, 3), 90, np.uint8)).save(thin)
    err = one_line_error(capsys, 2, segment(tiny, thin, tmp_path / "o", "--point", "1000,0"))
    assert f"{thin}: an image of 1x2000 is too elongated" in err
    line = tmp_path / "line.png"
    Image.fromarray(np.tile(PHOTO[:13, :200], (1, 10, 1))).save(line)
    assert segment(tiny, line, tmp_path / "o", "--point", "1000,6") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["size"] == [13, 2000]
    assert np.asarray(Image.open(report["prompts"][0]["masks"][0]["file"])).shape == (13, 2000)


@pytest.mark.full  # ~10 CPU-s: SAM-HQ's encoder and decoder programs compiled; the daily tier keeps the usage error
def test_hq_token_only(tiny_hq, photo_path, tmp_path, capsys):
    """--hq-token-only reaches predict: the PNGs are SAM-HQ's HQ masks alone, which differ from
    its default (SAM's mask + the HQ mask)."""
    out = tmp_path / "out"
    rc = segment(tiny_hq, photo_path, out, "--point", "100,60", "--hq-token-only")
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["hq_token_only"] is True
    pred = SamPredictor(tiny_hq.model, tiny_hq.params, compile_ahead=False)
    pred.set_image(PHOTO)
    hq_only = pred.predict([[100, 60]], [1], hq_token_only=True)[0]
    both = pred.predict([[100, 60]], [1])[0]
    assert len(report["prompts"][0]["masks"]) == 1  # SAM-HQ: one mask per prompt
    png = np.asarray(Image.open(report["prompts"][0]["masks"][0]["file"])) > 0
    np.testing.assert_array_equal(png, hq_only[0])  # same process, same program: exact
    assert not np.array_equal(hq_only[0], both[0])


def test_hq_token_only_needs_sam_hq_weights(tiny, photo_path, tmp_path, capsys):
    rc = segment(tiny, photo_path, tmp_path / "out", "--point", "100,60", "--hq-token-only")
    err = one_line_error(capsys, 2, rc)
    assert "--hq-token-only needs SAM-HQ weights" in err and tiny.weights in err
    assert not (tmp_path / "out").exists()
