"""The converter: strictness, error reporting, safety, round trips and the other model sizes."""

from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import sam_jax
from convert import ConversionError, convert_state_dict, detect_config, export_state_dict, plan_conversion
from convert.__main__ import main as convert_main
from sam_jax.checkpoints.hf import convert_hf_state_dict, official_to_hf
from tests.reference import count_params_without_torch, official_sam

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_cli(*args, module="convert"):
    r = subprocess.run(
        [sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    return r.returncode, r.stdout, r.stderr


def assert_short_error(code, err, *needles, exit_code=1):
    assert code == exit_code, err
    assert "Traceback" not in err
    assert 1 <= len(err.strip().splitlines()) <= 8, err
    for n in needles:
        assert n in err, err


def flat(params):
    return sam_jax.checkpoints.flatten_params(params)


def test_cli_converts_and_loads(tiny, tmp_path):
    out = tmp_path / "t.safetensors"
    code, stdout, err = run_cli(tiny.pth, out)
    assert code == 0, err
    assert "converted tiny" in stdout and "188 tensors" in stdout
    model, params = sam_jax.load(out)
    assert model.config == sam_jax.get_config("tiny")
    a, b = flat(params), flat(tiny.params)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.full  # ~5 CPU-s: a fresh process; the daily tier runs `python -m convert`
def test_console_script_convert(tiny, tmp_path):
    out = tmp_path / "t.safetensors"
    code, stdout, err = run_cli("convert", tiny.pth, out, module="sam_jax.cli")
    assert code == 0 and out.exists(), err


def test_in_memory_conversion_matches_cli(tiny):
    sd = tiny.torch_model.state_dict()
    for variant in (sd, {k: v.numpy() for k, v in sd.items()}, {"model": sd}, {"state_dict": sd}):
        cfg, params = convert_state_dict(variant)
        assert cfg == tiny.model.config
        a, b = flat(params), flat(tiny.params)
        assert all(np.array_equal(a[k], b[k]) for k in b)


def test_save_load_roundtrip_is_identical(tiny, tmp_path):
    path = tmp_path / "again.safetensors"
    sam_jax.save(path, tiny.params, tiny.model.config)
    model, params = sam_jax.load(path)
    assert model.config == tiny.model.config
    a, b = flat(params), flat(tiny.params)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_export_inverts_conversion(tiny):
    sd = {k: v.numpy() for k, v in tiny.torch_model.state_dict().items()}
    back = export_state_dict(tiny.params)
    assert back.keys() == sd.keys()
    for k in sd:
        assert np.array_equal(back[k], sd[k]), k


def test_load_pth_directly(tiny):
    model, params = sam_jax.load(tiny.pth)
    a, b = flat(params), flat(tiny.params)
    assert model.config == tiny.model.config and all(np.array_equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("name", ["tiny", "vit_b", "vit_l", "vit_h"])
def test_structure_of_every_size(name):
    """Official state_dict shapes (meta tensors, nothing allocated) map one-to-one onto our tree."""
    with torch.device("meta"):
        sd = official_sam(sam_jax.get_config(name)).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert detect_config(shapes) == sam_jax.get_config(name)
    cfg, mapping = plan_conversion(shapes, "auto")
    target = flat(sam_jax.param_shapes(sam_jax.build_sam(cfg)))
    assert sorted(mapping) == sorted(sd) and sorted(mapping.values()) == sorted(target)
    assert sum(int(np.prod(s)) for s in shapes.values()) == sam_jax.count_params(target)


# --- errors -------------------------------------------------------------------------------------


def test_truncated_file(tiny, tmp_path):
    src = tmp_path / "trunc.pth"
    with open(tiny.pth, "rb") as f:
        data = f.read()
    src.write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "truncated or corrupt")


def test_random_bytes(tmp_path):
    src = tmp_path / "random.pth"
    src.write_bytes(np.random.RandomState(0).bytes(4096))
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "not a PyTorch checkpoint")


@pytest.mark.full  # ~4 CPU-s: a fresh process; test_random_bytes runs daily
def test_random_bytes_looking_like_a_pickle(tmp_path):
    src = tmp_path / "random.pth"
    src.write_bytes(b"\x80" + np.random.RandomState(1).bytes(4096))
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "not a readable PyTorch checkpoint")


def test_empty_file(tmp_path):
    src = tmp_path / "empty.pth"
    src.write_bytes(b"")
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "empty")


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("wrapped", [False, True])
def test_malicious_pickle_never_runs(tiny, tmp_path, wrapped):
    sentinel = tmp_path / "pwned"
    src = tmp_path / "evil.pth"
    if wrapped:  # inside a genuine torch zip checkpoint, next to real tensors
        sd = dict(tiny.torch_model.state_dict())
        sd["payload"] = _Payload(sentinel)
        torch.save(sd, src)
    else:
        with open(src, "wb") as f:
            pickle.dump(_Payload(sentinel), f)
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert not sentinel.exists()
    assert_short_error(code, err, "nothing was executed" if wrapped else "PyTorch checkpoint")


def test_missing_key(tiny, tmp_path):
    sd = dict(tiny.torch_model.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    src = tmp_path / "missing.pth"
    torch.save(sd, src)
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "missing key mask_decoder.iou_token.weight")


@pytest.mark.full  # ~5 CPU-s: a fresh process; test_missing_key covers the key check daily
def test_extra_key(tiny, tmp_path):
    sd = dict(tiny.torch_model.state_dict())
    sd["mask_decoder.extra_head.weight"] = torch.zeros(3, 3)
    src = tmp_path / "extra.pth"
    torch.save({"model": sd}, src)
    code, _, err = run_cli(src, tmp_path / "o.safetensors")
    assert_short_error(code, err, "unexpected key mask_decoder.extra_head.weight")


@pytest.mark.parametrize(
    "stray",
    [
        "image_encoder.blocks.99.norm1.weight",
        "mask_decoder.transformer.layers.7.norm1.weight",
        "mask_decoder.iou_prediction_head.layers.9.bias",
    ],
)
def test_one_stray_key_is_reported_as_one_unexpected_key(tiny, tmp_path, capsys, stray):
    """Not as a deeper model with every key of its extra block missing."""
    sd = dict(tiny.torch_model.state_dict())
    sd[stray] = torch.zeros(48)
    src = tmp_path / "stray.pth"
    torch.save(sd, src)
    assert convert_main([str(src), str(tmp_path / "o.safetensors")]) == 1
    head = "the checkpoint holds tiny (embed dim 48, 3 blocks, image size 160) plus 1 unexpected key"
    assert capsys.readouterr().err == f"error: {head}\n  unexpected key {stray} (48,)\n"
    assert not os.path.exists(tmp_path / "o.safetensors")
    # The same check on Hugging Face names.
    hf = official_to_hf(export_state_dict(tiny.params))
    hf["vision_encoder.layers.99.layer_norm1.weight"] = np.zeros(48, np.float32)
    with pytest.raises(ConversionError) as e:
        convert_hf_state_dict(hf)
    assert e.value.headline == head
    assert e.value.problems == ["unexpected key vision_encoder.layers.99.layer_norm1.weight (48,)"]


def test_vit_b_with_one_stray_key():
    with torch.device("meta"):  # shapes only, nothing allocated
        sd = official_sam(sam_jax.get_config("vit_b")).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    shapes["image_encoder.blocks.99.norm1.weight"] = (768,)
    with pytest.raises(ConversionError) as e:
        plan_conversion(shapes)
    vit_b = "vit_b (embed dim 768, 12 blocks, image size 1024)"
    assert e.value.headline == f"the checkpoint holds {vit_b} plus 1 unexpected key"
    assert e.value.problems == ["unexpected key image_encoder.blocks.99.norm1.weight (768,)"]
    # Problems of several kinds are counted by kind.
    del shapes["image_encoder.neck.0.weight"]
    shapes["mask_decoder.iou_token.weight"] = (1, 7)
    with pytest.raises(ConversionError) as e:
        plan_conversion(shapes, "vit_b")
    assert e.value.headline == f"the checkpoint does not fit {vit_b}: 1 missing key, 1 wrong shape, 1 unexpected key"


def test_sam_hq_without_its_token_is_told_so():
    """A SAM-HQ checkpoint that lacks one of SAM-HQ's additions (here its output token) is still
    read as SAM-HQ, so the error names the missing key, not the other additions as unexpected."""
    with torch.device("meta"):
        sd = official_sam(sam_jax.get_config("sam_hq_vit_b")).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items() if k != "mask_decoder.hf_token.weight"}
    with pytest.raises(ConversionError) as e:
        plan_conversion(shapes)
    assert e.value.problems == ["missing key mask_decoder.hf_token.weight (1, 256)"], e.value.problems
    assert "SAM-HQ" in e.value.headline


def test_a_forced_config_deeper_than_the_checkpoint_is_refused_before_a_model_is_built():
    deep = dataclasses.replace(sam_jax.get_config("tiny"), encoder_depth=10**9)
    shapes = {f"image_encoder.blocks.{i}.norm1.weight": (48,) for i in range(5)}  # too little to detect a model
    with pytest.raises(ConversionError, match="encoder_depth 1000000000: more blocks than the 5 tensors"):
        plan_conversion(shapes, deep)


def test_wrong_shape(tiny):
    sd = dict(tiny.torch_model.state_dict())
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    with pytest.raises(ConversionError, match=r"mask_decoder.iou_token.weight: shape \(1, 7\), expected \(1, 48\)"):
        convert_state_dict(sd)


@pytest.mark.full  # ~4 CPU-s: a fresh process
def test_forced_model_type_of_another_size(tiny, tmp_path):
    code, _, err = run_cli(tiny.pth, tmp_path / "o.safetensors", "--model-type", "vit_b")
    assert_short_error(code, err, "does not match the checkpoint", "tiny", "vit_b")


def test_many_problems_are_summarised(tiny):
    sd = {k: v for k, v in tiny.torch_model.state_dict().items() if "blocks" not in k}
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd, "tiny")
    text = str(e.value)
    assert len(e.value.problems) == 3 * 14 and "more" in text and len(text.splitlines()) <= 8


def test_not_a_state_dict():
    with pytest.raises(ConversionError, match="expected a state_dict"):
        convert_state_dict([1, 2, 3])
    with pytest.raises(ConversionError, match="not tensors"):
        convert_state_dict({"image_encoder.pos_embed": "hello"})


@pytest.mark.parametrize(
    "args,needle",
    [
        ((), "the following arguments are required"),
        (("a.pth", "b.safetensors", "--model-type", "vit_x"), "invalid choice"),
        (("a.pth", "b.npz"), "must end in .safetensors"),
    ],
)
def test_usage_errors_exit_2_with_one_line(args, needle):
    code, _, err = run_cli(*args)
    assert_short_error(code, err, needle, exit_code=2)
    assert len(err.strip().splitlines()) == 1


def test_missing_source(tmp_path):
    code, _, err = run_cli(tmp_path / "nope.pth", tmp_path / "o.safetensors")
    assert_short_error(code, err, "no such file")


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.numpy import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"x": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(ValueError, match="foreign.safetensors: cannot detect the model type"):
        sam_jax.load(path)
    with pytest.raises(FileNotFoundError, match="no such weights file or folder"):
        sam_jax.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        sam_jax.load(tmp_path / "junk.safetensors")


def test_sam_jax_works_without_torch(tiny):
    """import sam_jax and loading a converted file must not need torch."""
    assert count_params_without_torch(tiny.weights) == 227604
