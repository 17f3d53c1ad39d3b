"""Hugging Face transformers SAM weights: names checked against the real `transformers.SamModel`,
conversion in both directions through the CLI, output parity with SamModel, and strict errors."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sam_jax
from convert.__main__ import main as convert_main
from sam_jax.checkpoints import ConversionError, convert_state_dict, flatten_params
from sam_jax.checkpoints.hf import (
    PE_HF,
    PE_HF_TIED,
    config_from_hf,
    convert_hf_state_dict,
    hf_config,
    is_hf_layout,
    load_hf,
    official_to_hf,
)
from tests import reference


transformers = reference.import_transformers()
HFSamConfig, HFSamModel = transformers.SamConfig, transformers.SamModel
TRANSFORMERS_VERSION = "5.23.0"  # the version these names were verified against (pyproject pins it)


def hf_load(folder: str, model_class=None) -> torch.nn.Module:
    """`model_class.from_pretrained` (default SamModel) that fails on any missing, unexpected or
    mis-shaped key."""
    model, info = (model_class or HFSamModel).from_pretrained(folder, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}, info
    return model.eval()


def export(ref, tmp_path) -> str:
    folder = str(tmp_path / f"hf_{ref.name}")
    assert convert_main(["--to", "hf", ref.weights, folder]) == 0
    return folder


def assert_same_params(a, b) -> None:
    fa, fb = flatten_params(a), flatten_params(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), k


@pytest.fixture(scope="module")
def tiny_hf(tiny, tmp_path_factory) -> str:
    return export(tiny, tmp_path_factory.mktemp("hf"))


# ---------------------------------------------------------------------------------------------
# Names and config.json against the installed transformers


def test_transformers_version():
    assert transformers.__version__ == TRANSFORMERS_VERSION


@pytest.mark.parametrize("name", ["tiny", "vit_b", "vit_l", "vit_h"])
def test_names_and_shapes_match_transformers(name):
    """Every official tensor renamed lands on a SamModel tensor of the same shape, and back. Both
    models on the meta device: nothing is allocated, so vit_h costs nothing."""
    cfg = sam_jax.get_config(name)
    with torch.device("meta"):
        official = reference.official_sam(cfg).state_dict()
        hf = HFSamModel(HFSamConfig.from_dict(hf_config(cfg))).state_dict()
    ours = {k: tuple(v.shape) for k, v in official_to_hf(official).items()}
    # PE_HF_TIED is the same Parameter as PE_HF; save_pretrained writes PE_HF only.
    theirs = {k: tuple(v.shape) for k, v in hf.items() if k != PE_HF_TIED}
    assert ours == theirs
    assert set(hf) - set(theirs) == {PE_HF_TIED}
    assert is_hf_layout(theirs) and not is_hf_layout(official)


@pytest.mark.parametrize("name", ["tiny", "vit_b", "vit_l", "vit_h"])
def test_config_json_round_trip(name):
    """hf_config -> transformers' own SamConfig -> its to_dict (every field, HF defaults filled in)
    -> config_from_hf gives the config back."""
    cfg = sam_jax.get_config(name)
    hc = HFSamConfig.from_dict(hf_config(cfg))
    v = hc.vision_config
    assert (
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        tuple(v.global_attn_indexes),
        v.image_size,
        v.patch_size,
        v.window_size,
    ) == (
        cfg.encoder_embed_dim,
        cfg.encoder_depth,
        cfg.encoder_num_heads,
        cfg.encoder_global_attn_indexes,
        cfg.image_size,
        cfg.patch_size,
        cfg.window_size,
    )
    assert hc.prompt_encoder_config.image_size == cfg.image_size
    assert hc.mask_decoder_config.layer_norm_eps == 1e-5  # the official two-way transformer norms
    assert config_from_hf(hc.to_dict()) == cfg


def test_config_from_hf_defaults_and_refusals():
    assert config_from_hf({"model_type": "sam"}) == sam_jax.get_config("vit_b")  # HF's defaults
    d = hf_config(sam_jax.get_config("vit_b"))
    d["mask_decoder_config"]["layer_norm_eps"] = 1e-6  # what HF's own conversions wrote: accepted
    assert config_from_hf(d) == sam_jax.get_config("vit_b")
    d["vision_config"]["hidden_act"] = "gelu_new"
    d["prompt_encoder_config"]["image_size"] = 512
    with pytest.raises(ConversionError) as e:
        config_from_hf(d)
    assert "vision_config.hidden_act" in str(e.value) and "prompt_encoder_config.image_size" in str(e.value)
    with pytest.raises(ConversionError, match="'sam2'"):
        config_from_hf({"model_type": "sam2"})


# ---------------------------------------------------------------------------------------------
# Conversion: official -> sam_jax and official -> HF -> sam_jax give the same params


def _hf_from_official(torch_model, cfg) -> torch.nn.Module:
    """A transformers SamModel (SamHQModel for SAM-HQ) holding the official weights, loaded
    strictly by name."""
    state = official_to_hf(torch_model.state_dict())
    state[PE_HF_TIED] = state[PE_HF]  # load_state_dict wants both names of the tied parameter
    model_class, config_class = (
        (transformers.SamHQModel, transformers.SamHQConfig) if cfg.hq else (HFSamModel, HFSamConfig)
    )
    hf = model_class(config_class.from_dict(hf_config(cfg))).eval()
    hf.load_state_dict(state, strict=True)
    return hf


def test_official_and_hf_checkpoints_give_identical_params(vit_b, tmp_path):
    """vit_b: the official .pth (converted by conftest through the CLI) and save_pretrained's folder
    and file give bitwise equal params."""
    folder = str(tmp_path / "sam-vit-b")
    _hf_from_official(vit_b.torch_model, vit_b.model.config).save_pretrained(folder)
    for src in (folder, os.path.join(folder, "model.safetensors")):
        out = str(tmp_path / "from_hf.safetensors")
        assert convert_main([src, out]) == 0
        model, params = sam_jax.load(out)
        assert model.config == vit_b.model.config
        assert_same_params(params, vit_b.params)


def test_hf_pytorch_bin_and_round_trip(tiny, tiny_hf, tmp_path):
    """An HF-named torch pickle (pytorch_model.bin) converts too; sam_jax -> HF -> sam_jax is exact."""
    state = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(tiny_hf, "model.safetensors")).items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    for src in (tiny_hf, str(tmp_path / "pytorch_model.bin")):
        out = str(tmp_path / "back.safetensors")
        assert convert_main([src, out]) == 0
        model, params = sam_jax.load(out)
        assert model.config == tiny.model.config
        assert_same_params(params, tiny.params)


def test_sam_jax_load_reads_hf_checkpoints_without_torch(tiny, tiny_hf, tmp_path):
    """`sam_jax.load` takes an HF folder or its model.safetensors directly (converted in memory,
    bitwise what the CLI gives), and needs no torch for either."""
    for src in (tiny_hf, os.path.join(tiny_hf, "model.safetensors")):
        model, params = sam_jax.load(src)
        assert model.config == tiny.model.config
        assert_same_params(params, tiny.params)
    assert reference.count_params_without_torch(tiny_hf) == sam_jax.count_params(tiny.params)
    with pytest.raises(ValueError, match="no model.safetensors"):  # a folder that is not HF
        sam_jax.load(tmp_path)


def test_positional_matrix_under_either_name(tiny, tiny_hf):
    state = load_file(os.path.join(tiny_hf, "model.safetensors"))
    assert PE_HF in state and PE_HF_TIED not in state  # as save_pretrained writes it
    both = {**state, PE_HF_TIED: state[PE_HF].copy()}
    tied_only = {PE_HF_TIED if k == PE_HF else k: v for k, v in state.items()}
    for s in (both, tied_only):
        assert_same_params(convert_hf_state_dict(s)[1], tiny.params)


def test_bfloat16_file(tiny, tiny_hf, tmp_path):
    from safetensors.torch import save_file as save_torch

    state = {
        k: torch.from_numpy(v).to(torch.bfloat16)
        for k, v in load_file(os.path.join(tiny_hf, "model.safetensors")).items()
    }
    save_torch(state, str(tmp_path / "model.safetensors"))
    _, params = load_hf(tmp_path / "model.safetensors")
    want = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32) for k, v in flatten_params(tiny.params).items()}
    got = flatten_params(params)
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------
# Parity: sam_jax and transformers' SamModel on the exported weights

# low-res mask logits: max abs error <= 1e-4 x std of the reference logits (float32 through two
# different attention implementations); IoU scores: 1e-5 absolute (O(1) values, a short MLP).
LOGITS_TOL, IOU_TOL, EMBED_TOL = 1e-4, 1e-5, 1e-4
PROMPTS = ("points", "box", "points_and_box")


def _prompts(kind: str, size: int, rng: np.random.Generator):
    """Two prompts in the model-input frame: sam_jax kwargs and transformers kwargs (1 image,
    point batch of 2)."""
    pts = rng.uniform(0, size, (2, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, 1], [1, 1, 0]], np.int32)
    xy = np.sort(rng.uniform(0, size, (2, 2, 2)), axis=1).reshape(2, 4).astype(np.float32)
    jx, hf = {}, {}
    if kind in ("points", "points_and_box"):
        jx.update(point_coords=jnp.asarray(pts), point_labels=jnp.asarray(labels))
        hf.update(input_points=torch.from_numpy(pts[None]), input_labels=torch.from_numpy(labels[None]))
    if kind in ("box", "points_and_box"):
        jx.update(boxes=jnp.asarray(xy))
        hf.update(input_boxes=torch.from_numpy(xy[None]))
    return jx, hf


def _compare(ref, hf_model, emb, kind, hf_inputs, seed):
    jx, hf = _prompts(kind, ref.model.config.image_size, np.random.default_rng(seed))
    errs = {}
    for multimask in (True, False):
        logits, iou = ref.model.apply(
            {"params": ref.params}, emb, multimask_output=multimask, method=sam_jax.Sam.decode, **jx
        )
        with torch.no_grad():
            out = hf_model(**hf_inputs, **hf, multimask_output=multimask)
        want_logits, want_iou = out.pred_masks[0].numpy(), out.iou_scores[0].numpy()
        assert want_logits.shape == logits.shape and want_iou.shape == iou.shape
        errs[multimask] = (
            float(np.max(np.abs(np.asarray(logits) - want_logits)) / np.std(want_logits)),
            float(np.max(np.abs(np.asarray(iou) - want_iou))),
        )
    print(f"{ref.name} {kind}: (logits err/std, IoU abs err) multimask {errs[True]}, single {errs[False]}")
    for logit_err, iou_err in errs.values():
        assert logit_err <= LOGITS_TOL and iou_err <= IOU_TOL, errs


@pytest.fixture(scope="module")
def tiny_parity(tiny, tiny_hf):
    """The exported tiny model in transformers, and both models' embeddings of one image."""
    hf_model = hf_load(tiny_hf)
    s = tiny.model.config.image_size
    image = np.random.default_rng(3).standard_normal((1, s, s, 3)).astype(np.float32)
    emb = tiny.model.apply({"params": tiny.params}, jnp.asarray(image), method=sam_jax.Sam.encode_image)
    with torch.no_grad():
        hf_emb = hf_model.get_image_embeddings(reference.to_nchw(image))
    return hf_model, image, np.asarray(emb), reference.to_nhwc(hf_emb)


def test_tiny_image_embeddings_match_transformers(tiny_parity):
    _, _, emb, hf_emb = tiny_parity
    err = float(np.max(np.abs(emb - hf_emb)) / np.std(hf_emb))
    print(f"tiny image embedding err/std {err:.2e}")
    assert err <= EMBED_TOL


# The daily tier keeps points; each other prompt kind costs ~6 CPU-s.
@pytest.mark.parametrize("kind", [k if k == "points" else pytest.param(k, marks=pytest.mark.full) for k in PROMPTS])
def test_tiny_end_to_end_matches_transformers(tiny, tiny_parity, kind):
    """Pixels in on both sides: transformers runs its own vision encoder."""
    hf_model, image, emb, _ = tiny_parity
    _compare(tiny, hf_model, jnp.asarray(emb), kind, {"pixel_values": reference.to_nchw(image)}, seed=5)


@pytest.fixture(scope="module")
def vit_b_hf(vit_b, tmp_path_factory) -> torch.nn.Module:
    return hf_load(export(vit_b, tmp_path_factory.mktemp("hf")))


@pytest.mark.parametrize("kind", ("points", "box"))
def test_vit_b_decoder_matches_transformers(vit_b, vit_b_hf, kind):
    """vit_b through the exported folder; one shared random image embedding stands in for the
    encoder (a vit_b forward costs ~13 s in torch; the tiny test covers the encoder)."""
    hf_model = vit_b_hf
    g = vit_b.model.config.embedding_size
    emb = np.random.default_rng(7).standard_normal((1, g, g, vit_b.model.config.prompt_embed_dim))
    emb = emb.astype(np.float32)
    _compare(vit_b, hf_model, jnp.asarray(emb), kind, {"image_embeddings": reference.to_nchw(emb)}, seed=9)


# ---------------------------------------------------------------------------------------------
# Strictness: short errors that name HF keys, and the CLI's exit codes


@pytest.fixture
def tiny_state(tiny_hf):
    return load_file(os.path.join(tiny_hf, "model.safetensors"))


def _error(state, config=None) -> str:
    """The ConversionError converting `state` raises (config: config.json's dict, or None): at
    most 8 lines."""
    with pytest.raises(ConversionError) as e:
        convert_hf_state_dict(state, config=config)
    text = str(e.value)
    assert len(text.splitlines()) <= 8
    return text


def test_missing_keys_are_named(tiny_state):
    del tiny_state["mask_decoder.iou_prediction_head.proj_out.bias"]
    del tiny_state["vision_encoder.neck.conv2.weight"]
    text = _error(tiny_state)
    assert "missing key mask_decoder.iou_prediction_head.proj_out.bias" in text
    assert "missing key vision_encoder.neck.conv2.weight" in text
    assert "image_encoder" not in text and "layers.2" not in text  # no official names leak out


def test_unexpected_keys_are_named(tiny_state):
    tiny_state["vision_encoder.extra.weight"] = np.zeros(3, np.float32)
    tiny_state["vision_encoder.layers.0.attn.qkv.scale"] = np.zeros(3, np.float32)
    text = _error(tiny_state)
    assert "plus 2 unexpected keys" in text
    assert "unexpected key vision_encoder.extra.weight" in text
    assert "unexpected key vision_encoder.layers.0.attn.qkv.scale" in text


def test_wrong_shape_is_named(tiny_state):
    tiny_state["mask_decoder.upscale_conv1.weight"] = tiny_state["mask_decoder.upscale_conv1.weight"][:, :3]
    assert "mask_decoder.upscale_conv1.weight: shape" in _error(tiny_state)


def test_different_duplicate_positional_matrices(tiny_state):
    tiny_state[PE_HF_TIED] = tiny_state[PE_HF] + 1.0
    text = _error(tiny_state)
    assert PE_HF in text and PE_HF_TIED in text and "differ" in text


def test_mixed_layouts_are_refused(tiny_state, tiny):
    tiny_state["image_encoder.pos_embed"] = tiny_state["vision_encoder.pos_embed"]
    with pytest.raises(ConversionError, match="mixes"):
        is_hf_layout(tiny_state)
    with pytest.raises(ConversionError, match="unexpected key image_encoder.pos_embed"):
        convert_hf_state_dict(tiny_state)  # never accepted under its official name


def test_config_json_must_match_the_weights(tiny_hf, tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(load_file(os.path.join(tiny_hf, "model.safetensors")), str(folder / "model.safetensors"))
    with open(os.path.join(tiny_hf, "config.json")) as f:
        config = json.load(f)
    config["vision_config"]["window_size"] = 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="vision_config.window_size"):
        load_hf(folder)
    assert convert_main([str(folder), str(tmp_path / "x.safetensors")]) == 1
    assert "vision_config.window_size" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "none"), str(tmp_path / "x.safetensors")]) == 1
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'none'}: no such file or folder (known names: ")


def test_cli_errors_and_exit_codes(tiny, tiny_hf, tmp_path, capsys):
    state = load_file(os.path.join(tiny_hf, "model.safetensors"))
    del state["vision_encoder.pos_embed"]
    bad = str(tmp_path / "model.safetensors")
    save_file(state, bad)
    capsys.readouterr()
    assert convert_main([bad, str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) <= 8
    assert "vision_encoder.pos_embed" in err
    assert not os.path.exists(tmp_path / "out.safetensors")
    # Usage errors: one line, exit 2.
    for argv in (
        ["--to", "onnx", tiny.weights, str(tmp_path / "o")],
        ["--to", "hf", tiny.weights, str(tmp_path / "o.safetensors")],
        [tiny_hf, str(tmp_path / "o.bin")],
        [tiny.weights],
    ):
        assert convert_main(argv) == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, argv
    # The official path is unchanged: .pth in, one line out.
    assert convert_main([tiny.pth, str(tmp_path / "t.safetensors")]) == 0
    assert capsys.readouterr().out.startswith("converted ")
    assert_same_params(sam_jax.load(str(tmp_path / "t.safetensors"))[1], tiny.params)


def test_official_names_still_use_the_official_rules(tiny):
    """The rename is the only HF-specific step: the official converter is the one that checks."""
    state = official_to_hf(tiny.torch_model.state_dict())
    cfg, params = convert_hf_state_dict(state)
    assert cfg == tiny.model.config
    assert_same_params(params, convert_state_dict(tiny.torch_model.state_dict())[1])
