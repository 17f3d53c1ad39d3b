"""Hugging Face transformers SAM-HQ weights (`SamHQModel`, config.json model_type "sam_hq"): names
checked against the real `transformers.SamHQModel`, conversion in both directions through the CLI,
output parity with SamHQModel, and strict errors. SAM's own layout is tests/checkpoints/test_hf.py,
whose helpers this reuses."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import sam_jax
from convert.__main__ import main as convert_main
from sam_jax.checkpoints import ConversionError, convert_state_dict
from sam_jax.checkpoints.hf import (
    PE_HF_TIED,
    config_from_hf,
    convert_hf_state_dict,
    hf_config,
    is_hf_layout,
    load_hf,
    official_to_hf,
)
from tests import reference
from tests.checkpoints.test_hf import (
    EMBED_TOL,
    IOU_TOL,
    LOGITS_TOL,
    PROMPTS,
    _error,
    _hf_from_official,
    _prompts,
    assert_same_params,
    hf_load,
)

transformers = reference.import_transformers()
HFSamHQConfig, HFSamHQModel = transformers.SamHQConfig, transformers.SamHQModel


@pytest.fixture(scope="module")
def tiny_hq_hf(tiny_hq, tmp_path_factory) -> str:
    """tiny_hq's sam_jax weights exported through the CLI into an HF folder."""
    folder = str(tmp_path_factory.mktemp("hf") / "hf_tiny_hq")
    assert convert_main(["--to", "hf", tiny_hq.weights, folder]) == 0
    return folder


# ---------------------------------------------------------------------------------------------
# Names and config.json against the installed transformers


# The full-size names cost no memory (meta device) but stay out of the daily tier with the sizes.
@pytest.mark.parametrize(
    "name",
    ["tiny_hq"] + [pytest.param(n, marks=pytest.mark.full) for n in ("sam_hq_vit_b", "sam_hq_vit_l", "sam_hq_vit_h")],
)
def test_names_and_shapes_match_transformers(name):
    """Every official SAM-HQ tensor renamed lands on a SamHQModel tensor of the same shape, and
    back; both models on the meta device."""
    cfg = sam_jax.get_config(name)
    with torch.device("meta"):
        official = reference.official_sam(cfg).state_dict()
        hf = HFSamHQModel(HFSamHQConfig.from_dict(hf_config(cfg))).state_dict()
    ours = {k: tuple(v.shape) for k, v in official_to_hf(official).items()}
    theirs = {k: tuple(v.shape) for k, v in hf.items() if k != PE_HF_TIED}  # save_pretrained writes PE_HF
    assert ours == theirs
    assert set(hf) - set(theirs) == {PE_HF_TIED}
    assert is_hf_layout(theirs) and not is_hf_layout(official)
    assert {k for k in theirs if k.startswith("mask_decoder.hq_")} == {
        "mask_decoder.hq_token.weight",
        *(
            f"mask_decoder.hq_mask_mlp.{m}.{leaf}"
            for m in ("proj_in", "layers.0", "proj_out")
            for leaf in ("weight", "bias")
        ),
    }


def test_config_json_round_trip():
    """hf_config -> transformers' own SamHQConfig -> its to_dict (HF defaults filled in) ->
    config_from_hf gives tiny_hq back. SamHQModel feeds its decoder the output of the first
    vision layer without windows, as sam_jax (the first global block): the layers it builds have
    window 0 exactly at the config's global indexes."""
    cfg = sam_jax.get_config("tiny_hq")
    hc = HFSamHQConfig.from_dict(hf_config(cfg))
    assert hc.model_type == "sam_hq" and hc.mask_decoder_config.vit_dim == cfg.encoder_embed_dim
    assert config_from_hf(hc.to_dict()) == cfg
    with torch.device("meta"):
        layers = HFSamHQModel(hc).vision_encoder.layers
    assert tuple(i for i, layer in enumerate(layers) if layer.window_size == 0) == cfg.encoder_global_attn_indexes
    # HF's defaults: vit_b's sizes, the ViT width 768 its decoder reads.
    assert config_from_hf({"model_type": "sam_hq"}) == sam_jax.get_config("sam_hq_vit_b")


def test_config_json_refusals():
    d = hf_config(sam_jax.get_config("tiny_hq"))
    d["mask_decoder_config"]["vit_dim"] = 64
    with pytest.raises(ConversionError, match="mask_decoder_config.vit_dim is 64, expected 48"):
        config_from_hf(d)
    del d["mask_decoder_config"]["vit_dim"]  # HF's default, 768: vit_b's width, not tiny's
    with pytest.raises(ConversionError, match="mask_decoder_config.vit_dim is 768, expected 48"):
        config_from_hf(d)
    d = hf_config(sam_jax.get_config("tiny_hq"))
    d["vision_config"]["global_attn_indexes"] = []  # SAM-HQ reads a global block's tokens
    with pytest.raises(ConversionError, match="model_type 'sam_hq' .*global-attention block"):
        config_from_hf(d)
    with pytest.raises(ConversionError, match="model_type 'sam2' is neither 'sam' nor 'sam_hq'"):
        config_from_hf({"model_type": "sam2"})


# ---------------------------------------------------------------------------------------------
# Conversion through the CLI, both directions


def test_save_pretrained_folder_converts_in(tiny_hq, tmp_path):
    """What SamHQModel.save_pretrained writes (folder, or its model.safetensors alone: SAM-HQ
    told by the keys) converts to params bitwise equal to the official .pth's; `sam_jax.load`
    reads the folder directly."""
    folder = str(tmp_path / "sam-hq-tiny")
    _hf_from_official(tiny_hq.torch_model, tiny_hq.model.config).save_pretrained(folder)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["model_type"] == "sam_hq"
    for src in (folder, os.path.join(folder, "model.safetensors")):
        out = str(tmp_path / "from_hf.safetensors")
        assert convert_main([src, out]) == 0
        model, params = sam_jax.load(out)
        assert model.config == tiny_hq.model.config
        assert_same_params(params, tiny_hq.params)
    model, params = sam_jax.load(folder)
    assert model.config == tiny_hq.model.config
    assert_same_params(params, tiny_hq.params)


def test_export_is_what_transformers_saves(tiny_hq, tiny_hq_hf):
    """`--to hf` writes SamHQModel's config (model_type sam_hq) and, tensor for tensor, the
    official weights under SamHQModel's names."""
    with open(os.path.join(tiny_hq_hf, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["architectures"]) == ("sam_hq", ["SamHQModel"])
    state = load_file(os.path.join(tiny_hq_hf, "model.safetensors"))
    want = official_to_hf(tiny_hq.torch_model.state_dict())
    assert sorted(state) == sorted(want)
    assert all(np.array_equal(state[k], want[k].numpy()) for k in want)


def test_official_pth_to_hf_and_back_is_bit_exact(tiny_hq, tmp_path):
    """official .pth -> (CLI) HF folder -> (CLI) official .pth: the same tensors, bitwise, which
    SAM-HQ's own model loads strictly."""
    folder, back = str(tmp_path / "hf"), str(tmp_path / "back.pth")
    assert convert_main(["--to", "hf", tiny_hq.pth, folder]) == 0
    assert convert_main(["--to", "pytorch", folder, back]) == 0
    got, want = torch.load(back, weights_only=True), tiny_hq.torch_model.state_dict()
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    reference.official_sam(tiny_hq.model.config).load_state_dict(got, strict=True)


# ---------------------------------------------------------------------------------------------
# Parity: sam_jax and transformers' SamHQModel on the exported weights
#
# Output selection: with multimask_output SAM-HQ keeps SAM's best mask by predicted IoU (plus the
# HQ mask); SamHQModel returns SAM's three sorted by IoU, each plus the HQ mask (or the HQ mask
# alone), so its first is SAM-HQ's one. Tolerances: test_hf's (the same float32 pipeline).
#
# transformers 5.23's SamHQMaskDecoder discards the two-way transformer's image-side output
# (`point_embedding, iou_token_out = self.transformer(...)`) and upscales the transformer's INPUT
# (image embeddings + dense prompt, H and W swapped by the `transpose(2, 3)` meant for the
# output's (B, P, HW, C) layout), where SAM-HQ, SAM and transformers' own SamMaskDecoder upscale
# the output. Its IoU scores are right; its masks are not SAM-HQ's. The parity test puts that one
# step right (`upscale_transformer_output`); `test_transformers_samhq_upscales_the_wrong_tensor`
# pins the defect, so a transformers that fixes it fails there first.


def upscale_transformer_output(hf_model) -> None:
    """Makes SamHQModel's decoder upscale its two-way transformer's image-side output, as SAM-HQ
    does: the output is written into the transformer's input tensor (the one the decoder goes on to
    upscale), laid out so that the decoder's `transpose(2, 3).reshape(...)` reads the output back."""
    transformer = hf_model.mask_decoder.transformer
    forward = transformer.forward

    def forward_and_write_back(*, image_embeddings, **kwargs):
        queries, keys = forward(image_embeddings=image_embeddings, **kwargs)
        n, c, h, w = image_embeddings.shape
        # keys (B, P, HW, C) -> SamMaskDecoder's (B * P, C, H, W), stored so that transposing H
        # and W and reshaping (what SamHQMaskDecoder does next) gives exactly that.
        image_embeddings.copy_(keys.transpose(2, 3).reshape(n, c, w, h).transpose(2, 3))
        return queries, keys

    transformer.forward = forward_and_write_back


@pytest.fixture(scope="module")
def tiny_hq_parity(tiny_hq, tiny_hq_hf):
    """The exported tiny SAM-HQ in transformers (its decoder's upscaling input put right), one
    image, and sam_jax's embeddings and HQ features of it."""
    hf_model = hf_load(tiny_hq_hf, HFSamHQModel)
    upscale_transformer_output(hf_model)
    s = tiny_hq.model.config.image_size
    image = np.random.default_rng(4).standard_normal((1, s, s, 3)).astype(np.float32)
    encode = jax.jit(tiny_hq.model.apply, static_argnames="method")  # compiled: a third of op-by-op's time
    emb, hq_features = encode({"params": tiny_hq.params}, jnp.asarray(image), method=sam_jax.Sam.encode_image_hq)
    return hf_model, image, emb, hq_features


def test_tiny_hq_image_embeddings_match_transformers(tiny_hq_parity):
    hf_model, image, emb, _ = tiny_hq_parity
    with torch.no_grad():
        hf_emb, interm = hf_model.get_image_embeddings(reference.to_nchw(image))
    assert len(interm) == len(sam_jax.get_config("tiny_hq").encoder_global_attn_indexes)
    hf_emb = reference.to_nhwc(hf_emb)
    err = float(np.max(np.abs(np.asarray(emb) - hf_emb)) / np.std(hf_emb))
    print(f"tiny_hq image embedding err/std {err:.2e}")
    assert err <= EMBED_TOL


SETTINGS = tuple((multimask, hq_token_only) for multimask in (True, False) for hq_token_only in (False, True))


# The daily tier keeps points; each other prompt kind costs ~ as much again.
@pytest.mark.parametrize("kind", [k if k == "points" else pytest.param(k, marks=pytest.mark.full) for k in PROMPTS])
def test_tiny_hq_end_to_end_matches_transformers(tiny_hq, tiny_hq_parity, kind):
    """Pixels in on both sides (SamHQModel runs its own vision encoder and HQ features); both
    hq_token_only settings, multimask and single mask."""
    hf_model, image, emb, hq_features = tiny_hq_parity
    jx, hf = _prompts(kind, tiny_hq.model.config.image_size, np.random.default_rng(8))

    @jax.jit  # the four settings in one compiled program: a third of the time of four op-by-op runs
    def decode_all(params, emb, hq_features, prompts):
        return [
            tiny_hq.model.apply(
                {"params": params},
                emb,
                multimask_output=multimask,
                hq_features=hq_features,
                hq_token_only=hq_token_only,
                method=sam_jax.Sam.decode,
                **prompts,
            )
            for multimask, hq_token_only in SETTINGS
        ]

    errs = {}
    for (multimask, hq_token_only), (logits, iou) in zip(SETTINGS, decode_all(tiny_hq.params, emb, hq_features, jx)):
        with torch.no_grad():
            out = hf_model(
                pixel_values=reference.to_nchw(image), **hf, multimask_output=multimask, hq_token_only=hq_token_only
            )
        # SamHQModel: (1 image, 2 prompts, masks, h, w), IoU (1, 2, scores); with multimask
        # its scores and SAM's masks are sorted, and its first is SAM-HQ's mask.
        n_iou = 3 if multimask else 1
        assert out.pred_masks.shape[2] == (1 if hq_token_only else n_iou) and out.iou_scores.shape[2] == n_iou
        want_logits, want_iou = out.pred_masks[0, :, :1].numpy(), out.iou_scores[0, :, :1].numpy()
        assert want_logits.shape == logits.shape and want_iou.shape == iou.shape
        errs[multimask, hq_token_only] = (
            float(np.max(np.abs(np.asarray(logits) - want_logits)) / np.std(want_logits)),
            float(np.max(np.abs(np.asarray(iou) - want_iou))),
        )
    print(f"tiny_hq {kind}: (logits err/std, IoU abs err) by (multimask, hq_token_only): {errs}")
    # test_hf's tolerances, for its reasons: logits within 1e-4 x std (float32 through two attention
    # implementations), IoU within 1e-5 (O(1) values out of a short MLP). Measured ~4e-6 and ~5e-7.
    for logit_err, iou_err in errs.values():
        assert logit_err <= LOGITS_TOL and iou_err <= IOU_TOL, errs


def test_transformers_samhq_upscales_the_wrong_tensor(tiny_hq_hf, tiny_hq_parity):
    """The defect `upscale_transformer_output` compensates: without it, SamHQModel's IoU scores
    are the same and its masks differ by O(std) (the upscaled tensor is another one entirely).
    Fails once transformers upscales the transformer's output: then drop the compensation."""
    fixed, image, _, _ = tiny_hq_parity
    as_shipped = hf_load(tiny_hq_hf, HFSamHQModel)
    _, hf = _prompts("points", image.shape[1], np.random.default_rng(8))
    with torch.no_grad():
        got, want = (
            m(pixel_values=reference.to_nchw(image), **hf, multimask_output=False) for m in (as_shipped, fixed)
        )
    assert torch.equal(got.iou_scores, want.iou_scores)
    err = float((got.pred_masks - want.pred_masks).abs().max() / want.pred_masks.std())
    print(f"SamHQModel as shipped: mask err/std {err:.2f}")
    assert err > 0.1  # measured ~2 on this model; anything under 1e-4 would be parity


# ---------------------------------------------------------------------------------------------
# Strictness: short errors that name SamHQModel's keys


@pytest.fixture
def hq_state(tiny_hq_hf):
    return load_file(os.path.join(tiny_hq_hf, "model.safetensors"))


def test_missing_hq_keys_are_named(hq_state):
    del hq_state["mask_decoder.hq_mask_mlp.proj_out.bias"]
    del hq_state["mask_decoder.compress_vit_conv1.weight"]
    text = _error(hq_state)
    assert "does not fit tiny_hq (SAM-HQ, " in text
    assert "missing key mask_decoder.hq_mask_mlp.proj_out.bias" in text
    assert "missing key mask_decoder.compress_vit_conv1.weight" in text
    assert "hf_mlp" not in text and "compress_vit_feat" not in text  # no official names leak out


def test_wrong_shape_hq_key_is_named(hq_state):
    hq_state["mask_decoder.mask_conv1.weight"] = hq_state["mask_decoder.mask_conv1.weight"][:, :, :2]
    hq_state["mask_decoder.hq_token.weight"] = np.zeros((1, 5), np.float32)
    text = _error(hq_state)
    assert "mask_decoder.mask_conv1.weight: shape (12, 6, 2, 3), expected (12, 6, 3, 3)" in text
    assert "mask_decoder.hq_token.weight: shape (1, 5), expected (1, 48)" in text


def test_unexpected_and_mixed_hq_keys(hq_state):
    hq_state["mask_decoder.hq_mask_mlp.proj_in.scale"] = np.zeros(48, np.float32)
    assert "plus 1 unexpected key" in _error(dict(hq_state))
    hq_state["mask_decoder.hf_token.weight"] = hq_state["mask_decoder.hq_token.weight"]
    with pytest.raises(ConversionError, match="mixes"):
        is_hf_layout(hq_state)


def test_config_json_and_weights_must_agree(tiny, tiny_hq, hq_state, tmp_path, capsys):
    """model_type 'sam' over SAM-HQ weights, and 'sam_hq' over SAM's, are refused, naming it."""
    sam_config = hf_config(tiny.model.config)
    assert "model_type: config.json says 'sam', the weights 'sam_hq'" in _error(hq_state, sam_config)
    sam_state = official_to_hf(tiny.torch_model.state_dict())
    hq_config = hf_config(tiny_hq.model.config)
    assert "model_type: config.json says 'sam_hq', the weights 'sam'" in _error(sam_state, hq_config)
    # Through the CLI: one short error, exit status 1, nothing written.
    folder = tmp_path / "bad"
    folder.mkdir()
    save_file(hq_state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(sam_config))
    out = tmp_path / "x.safetensors"
    assert convert_main([str(folder), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model_type" in err and len(err.splitlines()) <= 8
    assert not out.exists()
    with pytest.raises(ConversionError, match="does not match"):
        load_hf(folder)
    # --model-type takes the SAM-HQ presets, checked against the weights like the others.
    assert convert_main([tiny_hq.pth, str(out), "--model-type", "sam_hq_vit_b"]) == 1
    assert "does not match the checkpoint, which looks like tiny_hq" in capsys.readouterr().err


def test_official_names_still_use_the_official_rules(tiny_hq):
    """The rename is the only HF-specific step: the official converter is the one that checks."""
    state = official_to_hf(tiny_hq.torch_model.state_dict())
    cfg, params = convert_hf_state_dict(state)
    assert cfg == tiny_hq.model.config
    assert_same_params(params, convert_state_dict(tiny_hq.torch_model.state_dict())[1])
