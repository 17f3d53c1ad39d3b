"""Writing and reading weights files as users meet them: `sam_jax.save` writes only files that load,
and every weights file that does not load, or that is asked for the wrong model, ends in one clear
line naming the file and what is at fault (the key, the tensor, the field)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

import sam_jax
from convert.__main__ import main as convert_main
from sam_jax.checkpoints import flatten_params, load_source
from sam_jax.checkpoints.hf import export_hf
from sam_jax.checkpoints.native import is_safetensors, metadata
from sam_jax.cli import main as cli_main


def assert_one_line(message: str, *needles: str) -> None:
    assert len(message.strip().splitlines()) == 1 and "Traceback" not in message, message
    for n in needles:
        assert n in message, message


def rewrite(src: str, dst, meta=None, tensors=None) -> str:
    """A copy of the safetensors file SRC at DST, with its metadata and tensors replaced as given."""
    tensors = load_file(src) if tensors is None else tensors
    save_file(tensors, str(dst), metadata=metadata(src) if meta is None else meta)
    return str(dst)


# --- save ---------------------------------------------------------------------------------------


def test_save_refuses_params_that_do_not_fit_and_writes_nothing(tiny, tmp_path):
    out = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match=r"^params do not fit the vit_b model: missing image_encoder/"):
        sam_jax.save(out, tiny.params, "vit_b")
    with pytest.raises(TypeError, match="params must be the nested dict of arrays"):
        sam_jax.save(out, None, "tiny")
    without_decoder = {k: v for k, v in tiny.params.items() if k != "mask_decoder"}
    with pytest.raises(ValueError, match="params do not fit the tiny model: missing mask_decoder/"):
        sam_jax.save(out, without_decoder, "tiny")
    assert os.listdir(tmp_path) == []  # neither the file nor a temporary


def test_save_and_convert_onto_a_folder_leave_it_alone(tiny, tmp_path, capsys):
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    (folder / "mine.txt").write_text("keep")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        sam_jax.save(folder, tiny.params, "tiny")
    assert convert_main([tiny.weights, str(folder)]) == 1
    assert_one_line(capsys.readouterr().err, f"error: cannot write {folder}: is a folder")
    assert os.listdir(tmp_path) == ["w.safetensors"] and os.listdir(folder) == ["mine.txt"]  # no temporaries


@pytest.mark.parametrize("to", ["sam_jax", "pytorch"])
def test_convert_into_a_folder_that_does_not_exist(tiny, tmp_path, capsys, to):
    dst = tmp_path / "missing" / ("out.pth" if to == "pytorch" else "out.safetensors")
    assert convert_main(["--to", to, tiny.weights, str(dst)]) == 1
    assert_one_line(capsys.readouterr().err, f"error: cannot write {dst}: no such folder")
    assert os.listdir(tmp_path) == []


# --- the metadata of a sam_jax file -------------------------------------------------------------


def _with_config(tiny, tmp_path, **changes) -> str:
    meta = metadata(tiny.weights)
    meta["config"] = json.dumps({**json.loads(meta["config"]), **changes})
    return rewrite(tiny.weights, tmp_path / "w.safetensors", meta)


@pytest.mark.parametrize(
    "config,needle",
    [
        (None, "the metadata has no 'config'"),
        ("{not json", "metadata 'config' is not JSON (Expecting property name"),
        ("[1, 2]", "metadata 'config': a SamConfig is a mapping of its fields, got list"),
        ('"vit_b"', "metadata 'config': a SamConfig is a mapping of its fields, got str"),
    ],
)
def test_metadata_without_a_config_object(tiny, tmp_path, config, needle):
    meta = {k: v for k, v in metadata(tiny.weights).items() if k != "config"}
    if config is not None:
        meta["config"] = config
    path = rewrite(tiny.weights, tmp_path / "w.safetensors", meta)
    with pytest.raises(ValueError) as e:
        sam_jax.load(path)
    assert_one_line(str(e.value), f"{path}: {needle}")


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("patch_size", 0, "patch_size must be a positive integer, got 0"),
        ("encoder_embed_dim", -48, "encoder_embed_dim must be a positive integer, got -48"),
        ("image_size", "160", "image_size must be a positive integer, got '160'"),
        ("encoder_depth", 3.0, "encoder_depth must be a positive integer, got 3.0"),
        ("decoder_num_heads", True, "decoder_num_heads must be a positive integer, got True"),
        ("mlp_ratio", 0, "mlp_ratio must be a positive number, got 0"),
        ("encoder_global_attn_indexes", [1.5], "encoder_global_attn_indexes must be a list of block indexes"),
        ("mask_in_chans", None, "mask_in_chans must be a positive integer, got None"),
        ("encoder_num_heads", 5, "encoder_embed_dim must be divisible by encoder_num_heads"),
        ("colour", 3, "unknown SamConfig fields: ['colour']"),
    ],
)
def test_metadata_config_with_bad_fields(tiny, tmp_path, field, value, needle):
    path = _with_config(tiny, tmp_path, **{field: value})
    with pytest.raises(ValueError) as e:
        sam_jax.load(path)
    assert_one_line(str(e.value), f"{path}: metadata 'config': ", needle)


def test_cli_reports_a_bad_metadata_config_in_one_line(tiny, tmp_path, capsys):
    path = _with_config(tiny, tmp_path, patch_size=0)
    assert convert_main([path, str(tmp_path / "o.safetensors")]) == 1
    assert_one_line(capsys.readouterr().err, f"error: {path}: metadata 'config': ", "patch_size")
    image = tmp_path / "photo.png"
    Image.new("RGB", (32, 24)).save(image)
    argv = ["segment", str(image), "--weights", path, "--point", "5,5", "--out", str(tmp_path / "out")]
    assert cli_main(argv) == 2
    assert_one_line(capsys.readouterr().err, f"sam-jax segment: error: {path}: metadata 'config': ", "patch_size")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o.safetensors")


def test_tensors_that_are_not_params(tiny, tmp_path):
    flat = load_file(tiny.weights)
    key = "mask_decoder/iou_token/embedding"
    ints = rewrite(tiny.weights, tmp_path / "ints.safetensors", tensors={**flat, key: flat[key].astype(np.int32)})
    with pytest.raises(ValueError) as e:
        sam_jax.load(ints)
    assert_one_line(str(e.value), f"{ints}: tensor {key} is int32, params are floats")
    # A tensor named like a whole subtree: no tree to unflatten into, reported as a name that does not fit.
    clash = rewrite(tiny.weights, tmp_path / "clash.safetensors", tensors={**flat, "mask_decoder": np.zeros(1, "f4")})
    with pytest.raises(ValueError, match=f"^{clash} do not fit the tiny model: unexpected mask_decoder$"):
        sam_jax.load(clash)


# --- which file, which model --------------------------------------------------------------------


def test_a_sam_jax_file_under_another_name_loads(tiny, tmp_path, capsys):
    renamed = str(tmp_path / "weights.bin")
    shutil.copy(tiny.weights, renamed)
    assert is_safetensors(renamed) and not is_safetensors(tiny.pth)
    model, params = sam_jax.load(renamed)
    assert model.config == tiny.model.config
    a, b = flatten_params(params), flatten_params(tiny.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert convert_main([renamed, str(tmp_path / "again.safetensors")]) == 0, capsys.readouterr().err


def test_model_type_is_checked_for_every_kind_of_file(tiny, tmp_path):
    for path in (tiny.weights, tiny.pth):
        with pytest.raises(ValueError, match=r"^unknown model type 'vit_x'; expected one of \["):
            sam_jax.load(path, model_type="vit_x")
        with pytest.raises(TypeError, match="config must be a preset name or a SamConfig"):
            sam_jax.load(path, model_type=3)
    with pytest.raises(ValueError) as e:
        sam_jax.load(tiny.weights, model_type="vit_b")
    assert_one_line(str(e.value), f"{tiny.weights}: model type vit_b does not match the file, which holds tiny (")
    for model_type in ("tiny", sam_jax.get_config("tiny"), "auto"):
        assert sam_jax.load(tiny.weights, model_type=model_type)[0].config == tiny.model.config
    with pytest.raises(ValueError, match="unknown model type 'vit_x'"):
        load_source(tiny.weights, "vit_x")


# --- Hugging Face config.json -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_folder(tiny, tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("hf") / "sam-tiny")
    export_hf(tiny.params, "tiny", folder)
    return folder


@pytest.mark.parametrize(
    "edit,needle",
    [
        ("{junk", "config.json: not readable JSON (Expecting property name"),
        ("[1]", "config.json: expected a JSON object"),
        (("vision_config", None, [1]), "config.json: vision_config must be a JSON object, got list"),
        (("vision_config", "hidden_size", "48"), "config.json: vision_config.hidden_size must be a positive integer"),
        (("vision_config", "hidden_size", 0), "config.json: vision_config.hidden_size must be a positive integer"),
        (("vision_config", "mlp_dim", "x"), "config.json: vision_config.mlp_dim must be a positive integer, got 'x'"),
        (("vision_config", "patch_size", 0), "config.json: vision_config.patch_size must be a positive integer"),
        (("vision_config", "image_size", [160, 161]), "config.json: vision_config.image_size must be a positive"),
        (("vision_config", "global_attn_indexes", 5), "config.json: vision_config.global_attn_indexes must be a list"),
        (("mask_decoder_config", "num_attention_heads", None), "config.json: mask_decoder_config.num_attention_heads"),
    ],
)
def test_hf_config_json_errors_name_the_file_and_the_key(hf_folder, tmp_path, edit, needle):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    if isinstance(edit, str):
        text = edit
    else:
        section, key, value = edit
        config = json.loads((folder / "config.json").read_text())
        if key is None:
            config[section] = value
        else:
            config[section][key] = value
        text = json.dumps(config)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError) as e:
        sam_jax.load(folder)
    assert_one_line(str(e.value), f"{folder}{os.sep}{needle}")


def test_a_config_deeper_than_the_file_is_refused_before_a_model_is_built(tiny, tmp_path):
    """Building a model of 10^9 blocks to compare it with the file would take days."""
    path = _with_config(tiny, tmp_path, encoder_depth=10**9, encoder_global_attn_indexes=[])
    with pytest.raises(ValueError) as e:
        sam_jax.load(path)
    needle = "metadata 'config': encoder_depth 1000000000: more blocks than the 188 tensors of the checkpoint"
    assert_one_line(str(e.value), f"{path}: {needle}")
