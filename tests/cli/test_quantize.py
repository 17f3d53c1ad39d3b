"""`sam-jax quantize`: the tiny fixture's file quantized, loaded back without conversion, run by the
other subcommands' loader; and the usage errors (one line, exit status 2, nothing written)."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

import sam_jax
from sam_jax.cli import main as cli_main
from sam_jax.quantize import is_quantized, quantization_of

pytest.importorskip("qwix")


def _run(capsys, *args: str):
    rc = cli_main(["quantize", *args])
    out, err = capsys.readouterr()
    return rc, out, err


# Full tier: ~11 s a mode, most of it compiling the quantized predictor. Daily: test_default_mode_is_w8
# (the command writes a w8 file that loads) and tests/test_quantize.py (save / load, the predictor).
@pytest.mark.full
@pytest.mark.parametrize("mode", ["w8", "w8a8"])
def test_quantizes_into_a_file_that_loads(tiny, tmp_path, capsys, mode):
    out = str(tmp_path / f"tiny_{mode}.safetensors")
    rc, stdout, err = _run(capsys, tiny.weights, out, "--mode", mode)
    assert rc == 0, err
    assert stdout.startswith(f"quantized {tiny.weights} ({mode}):") and out in stdout
    model, params = sam_jax.load(out)
    assert is_quantized(model, params) and quantization_of(model)["mode"] == mode
    _is_the_library_quantization_and_runs(model, params, sam_jax.quantize(tiny.model, tiny.params, mode)[1])


def _is_the_library_quantization_and_runs(model, params, want) -> None:
    """The file's (model, params) hold what the library's own quantize gives for the same weights,
    bit for bit (`want`), and run where the float weights run."""
    got_leaves, want_leaves = (jax.tree_util.tree_leaves(t) for t in (params, want))
    assert len(got_leaves) == len(want_leaves)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got_leaves, want_leaves))
    p = sam_jax.SamPredictor(model, params, compile_ahead=False)
    p.set_image(np.zeros((40, 60, 3), np.uint8))
    masks, scores, _ = p.predict(point_coords=np.array([[30.0, 20.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 40, 60) and np.all(np.isfinite(scores))


def test_default_mode_is_w8(tiny, tmp_path, capsys):
    out = str(tmp_path / "q.safetensors")
    assert _run(capsys, tiny.weights, out)[0] == 0
    assert quantization_of(sam_jax.load(out)[0])["mode"] == "w8"


def test_usage_errors(tiny, tmp_path, capsys):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")

    def refused(*args: str, says: str) -> None:
        rc, stdout, err = _run(capsys, *args)
        assert rc == 2 and stdout == "", (args, err)
        assert err.count("\n") == 1 and err.startswith("sam-jax quantize: error: ") and says in err, err

    refused(tiny.weights, str(tmp_path / "q.pth"), says="must end in .safetensors")
    refused(tiny.weights, str(tmp_path / "q.safetensors"), "--mode", "w4", says="--mode")
    refused(tiny.weights, str(existing), says="--overwrite")
    refused(tiny.weights, tiny.weights, "--overwrite", says="is IN")
    refused(str(tmp_path / "missing.safetensors"), str(tmp_path / "q.safetensors"), says="missing.safetensors")
    assert existing.read_bytes() == b"keep me"  # nothing the user had is replaced
    assert sorted(os.listdir(tmp_path)) == ["existing.safetensors"]  # and nothing half-written is left

    # An already quantized file is refused too.
    q = str(tmp_path / "q.safetensors")
    assert _run(capsys, tiny.weights, q)[0] == 0
    refused(q, str(tmp_path / "qq.safetensors"), says="already quantized")


def _refused(capsys, *args: str, says: str) -> None:
    rc, stdout, err = _run(capsys, *args)
    assert rc == 2 and stdout == "", (args, err)
    assert err.count("\n") == 1 and err.startswith("sam-jax quantize: error: ") and says in err, err


def _write_images(folder, n: int) -> list:
    """n small RGB PNGs in folder; returns their paths."""
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(str(folder / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40 + 10 * i, 60, 3), dtype=np.uint8)).save(paths[-1])
    return paths


def test_calibration_usage_errors(tiny, tmp_path, capsys):
    """--calibration needs --mode w8a8 and a folder of images: otherwise one line, exit 2, nothing
    written."""
    out = str(tmp_path / "q.safetensors")
    images = tmp_path / "images"
    _write_images(images, 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    _write_images(junk, 1)
    (junk / "notes.txt").write_text("not an image")
    _refused(capsys, tiny.weights, out, "--calibration", str(images), says="--calibration sets static")
    _refused(capsys, tiny.weights, out, "--mode", "w8", "--calibration", str(images), says="needs --mode w8a8")
    _refused(capsys, tiny.weights, out, "--mode", "w8a8", "--calibration", str(empty), says="holds no files")
    missing = str(tmp_path / "nope")
    _refused(capsys, tiny.weights, out, "--mode", "w8a8", "--calibration", missing, says="no such folder")
    _refused(capsys, tiny.weights, out, "--mode", "w8a8", "--calibration", str(junk), says="notes.txt")
    assert not os.path.exists(out)


@pytest.mark.full  # ~15 s: calibration and the predictor compile the tiny encoder twice
def test_calibrated_file(tiny, tmp_path, capsys):
    """--mode w8a8 --calibration DIR: the library's calibrated quantization of the images in DIR
    (read as every subcommand reads images), bit for bit, in a file that loads and runs."""
    from sam_jax.cli.common import read_image

    paths = _write_images(tmp_path / "images", 2)
    out = str(tmp_path / "static.safetensors")
    rc, stdout, err = _run(capsys, tiny.weights, out, "--mode", "w8a8", "--calibration", str(tmp_path / "images"))
    assert rc == 0, err
    assert "static activation scales from 2 images" in stdout
    model, params = sam_jax.load(out)
    assert quantization_of(model)["static"] is True
    _, want = sam_jax.quantize(tiny.model, tiny.params, "w8a8", calibration=[read_image(p) for p in paths])
    _is_the_library_quantization_and_runs(model, params, want)


def test_overwrite_replaces(tiny, tmp_path, capsys):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"old")
    rc, _, err = _run(capsys, tiny.weights, str(existing), "--overwrite")
    assert rc == 0, err
    assert is_quantized(*sam_jax.load(str(existing)))


def test_convert_refuses_quantized_weights(tiny, tmp_path, capsys):
    """Conversion reads float weights: a quantized file is refused in one line, nothing written."""
    q = str(tmp_path / "q.safetensors")
    assert _run(capsys, tiny.weights, q)[0] == 0
    for args in ([q, str(tmp_path / "out.pth"), "--to", "pytorch"], [q, str(tmp_path / "hf"), "--to", "hf"]):
        rc = cli_main(["convert", *args])
        _, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and "holds quantized weights (w8)" in err, err
    assert sorted(os.listdir(tmp_path)) == ["q.safetensors"]
