"""`sam_jax.quantize`: qwix post-training int8 quantization, on the tiny model (daily tier) and
against the official fp32 predictor on the randomised vit_b (full tier).

Daily-tier tolerances are the tiny model's measured figures (random weights, 48 channels) with a
margin; the vit_b acceptance figures are the issue's (mean mask IoU >= 0.995 for w8, >= 0.99 for
w8a8; w8 parameter bytes <= 0.3x fp32). Measured figures print with `-s`.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sam_jax
from sam_jax import functional as F
from sam_jax.quantize import DEFAULT_LAYERS, MODES, is_quantized, param_bytes, quantization_of, quantize
from tests.fidelity import MASKS, against_official, figure_report

FIGURES, _print_figures = figure_report()


@pytest.fixture(scope="module")
def quantized(tiny):
    return {mode: quantize(tiny.model, tiny.params, mode) for mode in MODES}


def _is_aux(x) -> bool:
    return type(x).__name__ == "WithAux"


@pytest.mark.parametrize("mode", MODES)
def test_params_int8_per_output_channel(tiny, quantized, mode):
    qmodel, qparams = quantized[mode]
    assert is_quantized(model=qmodel) and is_quantized(params=qparams)
    assert not is_quantized(tiny.model, tiny.params)
    flat = traverse_util.flatten_dict(qparams, is_leaf=lambda _, x: _is_aux(x))
    floats = traverse_util.flatten_dict(tiny.params)
    assert set(flat) == set(floats)  # same tree: only leaves change
    quantized_keys = {k for k, v in flat.items() if _is_aux(v)}
    for k in quantized_keys:
        q, w = flat[k].array, floats[k]
        assert k[-1] == "kernel"
        assert q.qvalue.dtype == jnp.int8 and q.scale.dtype == jnp.float32
        assert q.qvalue.size == w.size
        # The scales span every axis but the contracted one, which they tile: one scale per output
        # channel in "w8a8" (a Dense kernel (in, out): (1, out)), one per tile of input channels in
        # "w8" (test_w8_subchannel_scales_and_float16 checks the tile sizes).
        contracted = [a for a, (n, s) in enumerate(zip(q.qvalue.shape, q.scale.shape)) if n != s]
        assert len(contracted) == 1, (k, q.scale.shape)
        if mode == "w8a8":
            assert q.scale.shape[contracted[0]] == 1, (k, q.scale.shape)
        # Dequantized kernels within half a step of the float ones (absmax scaling, rounding).
        a = contracted[0]
        step = np.repeat(np.asarray(q.scale), q.qvalue.shape[a] // q.scale.shape[a], axis=a)
        assert np.all(np.abs(np.asarray(q.qvalue, np.float32) * step - w) <= 0.5 * step + 1e-7), k
    for k in set(flat) - quantized_keys:  # unchanged, or stored float16 ("w8": HALF_PARAMS)
        assert np.array_equal(flat[k], floats[k].astype(flat[k].dtype)), k
    # Every group of DEFAULT_LAYERS is quantized: the encoder blocks' four matmuls; the decoder
    # stays float.
    names = {"/".join(k) for k in quantized_keys}
    for part in ("attn/qkv", "attn/proj", "mlp/lin1", "mlp/lin2"):
        assert any(part in n for n in names), part
    assert not any(n.startswith("mask_decoder") for n in names)
    assert param_bytes(qparams) < param_bytes(tiny.params)


def test_pure_functions_inside_jit(tiny, quantized):
    """`encode_images` / `decode_prompts` of the quantized model inside a user's jit. Embeddings
    against the float model's: close and not identical (tiny, random weights: measured max error
    0.058 x std for w8, 0.071 for w8a8, hence 0.15). The logits' fidelity is the vit_b test's
    (a float decoder compilation here would cost the daily tier ~2 s)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 160, 160, 3), dtype=np.uint8)
    sizes = np.array([[160, 160]], np.int32)
    coords, labels = jnp.array([[[50.0, 70.0], [100.0, 30.0]]]), jnp.array([[1, 0]])

    def encode(model, params):
        return F.encode_images(model, params, image, sizes)

    def encode_decode(model, params):
        emb = F.encode_images(model, params, image, sizes)
        return emb, F.decode_prompts(model, params, emb, coords, labels, multimask_output=True)

    e0 = jax.jit(encode, static_argnums=0)(tiny.model, tiny.params)
    for mode, (qm, qp) in quantized.items():
        if mode == "w8a8":
            e, (logits, iou) = jax.jit(encode_decode, static_argnums=0)(qm, qp)
            assert logits.shape == (1, 3, 40, 40) and iou.shape == (1, 3)
            assert bool(jnp.all(jnp.isfinite(logits)))
        else:
            e = jax.jit(encode, static_argnums=0)(qm, qp)
        emb_err = float(jnp.max(jnp.abs(e - e0)) / jnp.std(e0))
        FIGURES[f"tiny {mode} jit"] = {"emb max err/std": emb_err}
        assert 0 < emb_err <= 0.15, emb_err


def test_predictor(tiny, quantized, monkeypatch):
    """SamPredictor takes (qmodel, qparams) as it takes a float model: set_image, predict,
    predict_batch (one prompt: the same decoder program as predict, so no second compilation
    here). A "w8a8" encoder runs as one jit with XLA's defaults, not in the CPU stages
    (`backend.staging_pays`: its int8 dots run ~1.8x faster in XLA:CPU's YNNPACK fusions)."""
    from sam_jax import backend

    staged = []
    real = backend.encode_staged
    monkeypatch.setattr(backend, "encode_staged", lambda *a, **k: staged.append(1) or real(*a, **k))
    qm, qp = quantized["w8a8"]
    image = (np.random.default_rng(1).random((120, 150, 3)) * 255).astype(np.uint8)
    pr = sam_jax.SamPredictor(qm, qp, compile_ahead=False)
    pr.set_image(image)
    assert not staged
    assert not backend.staging_pays(tiny.model.config, int8_activations=True)
    masks, iou, low = pr.predict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
    bm, biou, blow = pr.predict_batch(point_coords=np.array([[[60.0, 50.0]]]), point_labels=np.array([[1]]))
    assert masks.shape == (3, 120, 150) and masks.dtype == bool and bm.shape == (1, 3, 120, 150)
    assert pr.get_image_embedding().shape == (1, 48, 10, 10)
    # With two prompts per call, float rounding noise (~2e-6 x std) can move a value across a
    # rounding boundary of the dynamic int8 activations: measured 0.068 x std on the tiny model.
    # One prompt: the same computation.
    np.testing.assert_array_equal(bm[0], masks)
    np.testing.assert_allclose(blow[0], low, rtol=0, atol=1e-5 * float(np.std(low)))
    np.testing.assert_allclose(biou[0], iou, rtol=0, atol=1e-6)


def test_save_load_round_trip(tiny, quantized, tmp_path):
    """`sam_jax.save(path, qparams, qmodel)` writes int8 kernels and float32 scales, the metadata
    records the mode; `sam_jax.load` (no torch) returns the quantized model and equal params."""
    from sam_jax.checkpoints.native import metadata

    qm, qp = quantized["w8a8"]
    path = str(tmp_path / "q.safetensors")
    sam_jax.save(path, qp, qm)
    meta = metadata(path)
    assert '"mode": "w8a8"' in meta["quantization"]
    model, params = sam_jax.load(path)
    assert is_quantized(model=model) and is_quantized(params=params) and model.config == tiny.model.config
    assert quantization_of(model) == quantization_of(qm)
    want = jax.tree_util.tree_leaves_with_path(qp)
    got = jax.tree_util.tree_leaves_with_path(params)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(qp)
    for (kw, w), (kg, g) in zip(want, got):
        assert kw == kg and w.dtype == g.dtype
        np.testing.assert_array_equal(g, w)
    with pytest.raises(ValueError, match="pass the quantized model"):
        sam_jax.save(str(tmp_path / "x.safetensors"), qp, tiny.model.config)
    assert not (tmp_path / "x.safetensors").exists()


def test_bad_arguments(tiny, quantized):
    qm, qp = quantized["w8"]
    with pytest.raises(ValueError, match="mode"):
        quantize(tiny.model, tiny.params, "int4")
    with pytest.raises(ValueError, match="already quantized"):
        quantize(qm, tiny.params, "w8")
    with pytest.raises(ValueError, match="params are already quantized"):
        quantize(tiny.model, qp, "w8")
    with pytest.raises(TypeError, match="model"):
        quantize(object(), tiny.params, "w8")
    with pytest.raises(ValueError, match="calibration.*'w8'"):
        quantize(tiny.model, tiny.params, "w8", calibration=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="layers"):
        quantize(tiny.model, tiny.params, "w8", layers=("qkv", "nope"))
    flat = dict(traverse_util.flatten_dict(tiny.params, sep="/"))
    missing = {k: v for k, v in flat.items() if not k.endswith("mlp/lin1/kernel")}
    with pytest.raises(ValueError, match="missing image_encoder/blocks_0/mlp/lin1/kernel"):
        quantize(tiny.model, traverse_util.unflatten_dict(missing, sep="/"), "w8")
    bad = dict(flat, **{"image_encoder/blocks_0/attn/qkv/kernel": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="qkv/kernel: shape"):
        quantize(tiny.model, traverse_util.unflatten_dict(bad, sep="/"), "w8")


# --- Static activation scales ("w8a8" with calibration images). ---


def _calibration_images() -> list:
    """Two small calibration images: an RGB one and a grayscale (H, W) one."""
    rng = np.random.default_rng(3)
    return [rng.integers(0, 256, (120, 150, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70), dtype=np.uint8)]


# Embedding mean |error| / std of the calibrated tiny model against the float one, on
# test_static_predictor_and_round_trip's image: measured 0.022 (dynamic scales: 0.017; max |error|
# 0.18 and 0.12); about twice that for another XLA / qwix version or calibration noise.
STATIC_TINY_EMB_ERR_BOUND = 0.04


@pytest.fixture(scope="module")
def calibrated(tiny):
    return quantize(tiny.model, tiny.params, "w8a8", calibration=_calibration_images())


@pytest.mark.full  # ~9 s: the calibration compiles the tiny encoder (the fixture), then the float one
def test_static_scales_per_tensor(tiny, quantized, calibrated):
    """One float32 scale per activation tensor of each calibrated layer (the encoder's four
    matmuls), beside its kernel; the kernels are the dynamic mode's. The first block's qkv scale,
    whose input no quantized layer precedes, is the mean over the images of that input's absmax
    / 127.5 (qwix's int8 bound: values round to -128..127)."""
    from qwix._src.core.numerics import get_symmetric_bound

    from sam_jax.functional import prepare_images
    from sam_jax.quantize import STATIC_LAYERS
    from sam_jax.transforms import preprocess_padded

    qm, qp = calibrated
    assert quantization_of(qm) == dict(quantization_of(quantized["w8a8"][0]), static=True)
    flat = traverse_util.flatten_dict(qp, sep="/", is_leaf=lambda _, x: _is_aux(x))
    dynamic = traverse_util.flatten_dict(quantized["w8a8"][1], sep="/", is_leaf=lambda _, x: _is_aux(x))
    scales = {k: v for k, v in flat.items() if _is_aux(v) and not hasattr(v.array, "qvalue")}
    kernels = {k for k, v in flat.items() if _is_aux(v) and hasattr(v.array, "qvalue")}
    assert set(flat) - set(scales) == set(dynamic) and kernels == {k for k, v in dynamic.items() if _is_aux(v)}
    assert {k.rsplit("/", 1)[0] for k in scales} == {k.rsplit("/", 1)[0] for k in kernels}
    assert all(k.endswith("/dot_general0_lhs_scale") for k in scales), sorted(scales)
    assert len(scales) == len(kernels) == len(STATIC_LAYERS) * tiny.model.config.encoder_depth
    for k, v in scales.items():
        assert v.array.shape == (1,) and v.array.dtype == jnp.float32 and float(v.array[0]) > 0, k
    for k in kernels:
        np.testing.assert_array_equal(flat[k].array.qvalue, dynamic[k].array.qvalue)
        np.testing.assert_array_equal(flat[k].array.scale, dynamic[k].array.scale)

    def qkv_input(padded, sizes):  # blocks_0's norm1 output: what its qkv layer multiplies
        _, state = tiny.model.apply(
            {"params": tiny.params},
            preprocess_padded(padded, sizes),
            method="encode_image",
            capture_intermediates=lambda m, _: m.name == "norm1" and m.scope.path[-2] == "blocks_0",
            mutable=["intermediates"],
        )
        return state["intermediates"]["image_encoder"]["blocks_0"]["norm1"]["__call__"][0]

    absmax = [
        float(jnp.max(jnp.abs(jax.jit(qkv_input)(*prepare_images([im], tiny.model.config.image_size)[:2]))))
        for im in _calibration_images()
    ]
    got = float(scales["image_encoder/blocks_0/attn/qkv/dot_general0_lhs_scale"].array[0])
    # The same float32 values reduced in another order: equal to float32 rounding.
    assert get_symmetric_bound(jnp.int8) == 127.5
    np.testing.assert_allclose(got, np.mean(absmax) / 127.5, rtol=1e-6)


@pytest.mark.full  # ~7 s: the predictor compiles the staged encoder and the decoder
def test_static_predictor_and_round_trip(tiny, calibrated, tmp_path):
    """The calibrated model saves ("static": true in the metadata), loads back equal (no torch),
    and runs in SamPredictor; its embedding is close to the float model's (STATIC_TINY_EMB_ERR_BOUND)."""
    from sam_jax.checkpoints.native import metadata

    qm, qp = calibrated
    path = str(tmp_path / "static.safetensors")
    sam_jax.save(path, qp, qm)
    assert '"static": true' in metadata(path)["quantization"]
    model, params = sam_jax.load(path)
    assert quantization_of(model) == quantization_of(qm)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(qp)
    for (kw, w), (kg, g) in zip(jax.tree_util.tree_leaves_with_path(qp), jax.tree_util.tree_leaves_with_path(params)):
        assert kw == kg and w.dtype == g.dtype and w.shape == g.shape, kw
        np.testing.assert_array_equal(g, w)

    image = (np.random.default_rng(1).random((120, 150, 3)) * 255).astype(np.uint8)
    pr = sam_jax.SamPredictor(model, params, compile_ahead=False)
    pr.set_image(image)
    masks, iou, _ = pr.predict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([1]))
    assert masks.shape == (3, 120, 150) and masks.dtype == bool and np.all(np.isfinite(iou))
    padded, sizes, _ = F.prepare_images([image], tiny.model.config.image_size)
    e0 = jax.jit(F.encode_images, static_argnums=0)(tiny.model, tiny.params, padded, sizes)
    emb = np.asarray(pr.get_image_embedding()).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    err = float(np.mean(np.abs(emb - e0)) / np.std(e0))
    FIGURES["tiny w8a8 static"] = {"emb mean err/std": err}
    assert 0 < err <= STATIC_TINY_EMB_ERR_BOUND, err


def test_bad_calibration(tiny):
    """Refused before anything runs, naming `calibration`."""
    with pytest.raises(ValueError, match="calibration.*'w8'"):
        quantize(tiny.model, tiny.params, "w8", calibration=_calibration_images())
    with pytest.raises(TypeError, match="calibration must be a list of images"):
        quantize(tiny.model, tiny.params, "w8a8", calibration="photos/")
    with pytest.raises(TypeError, match="calibration must be a list of images"):
        quantize(tiny.model, tiny.params, "w8a8", calibration=np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="calibration is empty"):
        quantize(tiny.model, tiny.params, "w8a8", calibration=[])
    with pytest.raises(ValueError, match=r"calibration\[1\] looks channels-first"):
        quantize(tiny.model, tiny.params, "w8a8", calibration=[np.zeros((8, 8, 3), np.uint8), np.zeros((3, 8, 8))])
    with pytest.raises(TypeError, match=r"calibration\[0\] must be uint8"):
        quantize(tiny.model, tiny.params, "w8a8", calibration=[np.array([["a"]])])
    with pytest.raises(ValueError, match="none of layers"):
        quantize(tiny.model, tiny.params, "w8a8", _calibration_images(), layers=("decoder_mlp",))


def test_default_layers_are_known():
    from sam_jax.quantize import LAYERS

    for mode in MODES:
        assert set(DEFAULT_LAYERS[mode]) <= set(LAYERS)


# --- Full tier: vit_b against the official fp32 predictor on real photos. ---

# Figures measured 2026-12-05 (randomised vit_b, seed 1; tests/fidelity.py's four photos, 4 prompt
# kinds x 3 masks each; qwix 0.1.8, XLA:CPU). The mean IoU floors are issue 27's acceptance (w8 >=
# 0.995, w8a8 >= 0.99), met: w8 0.9960 (the encoder's four matmuls int8 with one scale per 64 input
# channels, decoder and position embedding float16), w8a8 0.9932 (the same matmuls, per-channel
# weights and per-token activations, decoder float32). Other bounds: the measured figure with a
# margin for another XLA / qwix version (the table in sam_jax/quantize.py has the alternatives).
MEAN_IOU = {"w8": 0.995, "w8a8": 0.99}  # issue 27; measured 0.9960 (w8), 0.9932 (w8a8)
MIN_IOU = {"w8": 0.98, "w8a8": 0.965}  # measured min 0.9899 (w8), 0.9785 (w8a8)
EMB_MEAN_ERR = {"w8": 0.04, "w8a8": 0.07}  # mean |err| / std; measured 0.026 (w8), 0.050 (w8a8)
LOGIT_MEAN_ERR = {"w8": 0.03, "w8a8": 0.05}  # low-res logits, mean |err| / std; measured 0.016 / 0.029
W8_BYTES_RATIO = 0.3  # the bound; measured 0.2888 (int8 kernels, float32 scales, float16 rest)


@pytest.mark.full
def test_vit_b_bytes(vit_b):
    _, qp = quantize(vit_b.model, vit_b.params, "w8")
    ratio = param_bytes(qp) / param_bytes(vit_b.params)
    FIGURES["vit_b w8 bytes"] = {"quantized": param_bytes(qp), "fp32": param_bytes(vit_b.params), "ratio": ratio}
    assert ratio <= W8_BYTES_RATIO, ratio


@pytest.mark.full
@pytest.mark.parametrize("mode", MODES)
def test_vit_b_against_official_fp32(vit_b, mode):
    qm, qp = quantize(vit_b.model, vit_b.params, mode)
    fig = against_official(vit_b.torch_model, sam_jax.SamPredictor(qm, qp, compile_ahead=False))
    FIGURES[f"vit_b {mode} vs official fp32"] = fig
    assert fig["masks"] == MASKS
    assert fig["mean mask IoU"] >= MEAN_IOU[mode], fig
    assert fig["min mask IoU"] >= MIN_IOU[mode], fig
    assert fig["emb mean err/std"] <= EMB_MEAN_ERR[mode], fig
    assert fig["low-res logits mean err/std"] <= LOGIT_MEAN_ERR[mode], fig


# Calibration photos: skimage's bundled RGB photographs that are not tests/fidelity.py's PHOTOS.
CALIBRATION = ("stereo_motorcycle", "hubble_deep_field", "retina", "immunohistochemistry")


def calibration_photos() -> list:
    import skimage.data

    out = []
    for name in CALIBRATION:
        image = getattr(skimage.data, name)()
        out.append(image[0] if isinstance(image, tuple) else image)  # stereo_motorcycle: (left, right, disparity)
    return out


# "w8a8" with static activation scales calibrated on CALIBRATION, against the official fp32
# predictor on the fidelity photos. Measured 2026-12-05: mean mask IoU 0.9917 (min 0.9760),
# embedding mean error 0.065 x std, low-res logits 0.036 x std (dynamic scales: 0.9932 / 0.9785 /
# 0.050 / 0.029). The mean IoU floor is issue 27's "w8a8" acceptance, met; the others are the
# measured figures with the dynamic mode's margins (another XLA / qwix version).
STATIC_FLOORS = {
    "mean mask IoU": 0.99,  # issue 27; measured 0.9917
    "min mask IoU": 0.96,  # measured 0.9760
    "emb mean err/std": 0.09,  # at most; measured 0.065
    "low-res logits mean err/std": 0.05,  # at most; measured 0.036
}


@pytest.mark.full
def test_vit_b_static_scales_against_official_fp32(vit_b):
    qm, qp = quantize(vit_b.model, vit_b.params, "w8a8", calibration=calibration_photos())
    assert quantization_of(qm)["static"]
    fig = against_official(vit_b.torch_model, sam_jax.SamPredictor(qm, qp, compile_ahead=False))
    FIGURES["vit_b w8a8 static vs official fp32"] = fig
    assert fig["masks"] == MASKS
    assert fig["mean mask IoU"] >= STATIC_FLOORS["mean mask IoU"], fig
    assert fig["min mask IoU"] >= STATIC_FLOORS["min mask IoU"], fig
    assert fig["emb mean err/std"] <= STATIC_FLOORS["emb mean err/std"], fig
    assert fig["low-res logits mean err/std"] <= STATIC_FLOORS["low-res logits mean err/std"], fig


# --- Subchannel scales and float16 storage ("w8"). ---


def _dequantized(qparams) -> dict:
    """The float32 params a quantized model computes with in "w8": each int8 kernel times its
    scales (each scale repeated over its tile of input channels), float16 leaves widened."""
    flat = traverse_util.flatten_dict(qparams, is_leaf=lambda _, x: _is_aux(x))
    out = {}
    for k, v in flat.items():
        if _is_aux(v):
            q = v.array
            scale = np.asarray(q.scale)
            for axis, (n, s) in enumerate(zip(q.qvalue.shape, scale.shape)):
                scale = np.repeat(scale, n // s, axis=axis)
            out[k] = jnp.asarray(np.asarray(q.qvalue, np.float32) * scale)
        else:
            out[k] = jnp.asarray(v, jnp.float32)
    return traverse_util.unflatten_dict(out)


def test_w8_subchannel_scales_and_float16(tiny, quantized):
    """The "w8" mode on the tiny model (48 channels, MLP 192): one float32 scale per 16 input
    channels of each output channel where 64 does not divide 48 (qkv, proj, lin1), per 64 for lin2;
    the `HALF_PARAMS` stored float16, every other float param unchanged."""
    import re

    from sam_jax.quantize import HALF_PARAMS, LAYERS, TILE_SIZE, tile_sizes

    qm, qp = quantized["w8"]
    tiles = quantization_of(qm)["tiles"]
    assert tiles == {"qkv": 16, "proj": 16, "mlp_lin1": 16, "mlp_lin2": 64}
    assert tiles == tile_sizes(tiny.params, DEFAULT_LAYERS["w8"], TILE_SIZE["w8"])
    assert tile_sizes(tiny.params, DEFAULT_LAYERS["w8"], None) == dict.fromkeys(DEFAULT_LAYERS["w8"])
    assert quantization_of(quantized["w8a8"][0])["tiles"] == dict.fromkeys(DEFAULT_LAYERS["w8a8"])
    flat = traverse_util.flatten_dict(qp, sep="/", is_leaf=lambda _, x: _is_aux(x))
    floats = traverse_util.flatten_dict(tiny.params, sep="/")
    half = 0
    for k, v in flat.items():
        w = floats[k]
        if _is_aux(v):
            group = next(n for n in DEFAULT_LAYERS["w8"] if re.fullmatch(LAYERS[n], k[: -len("/kernel")]))
            q = v.array
            assert q.qvalue.shape == w.shape and q.qvalue.dtype == jnp.int8 and q.scale.dtype == jnp.float32
            assert q.scale.shape == (w.shape[0] // tiles[group], w.shape[1]), (k, q.scale.shape)
            deq = traverse_util.flatten_dict(_dequantized({"x": v}), sep="/")["x"]
            step = np.repeat(np.asarray(q.scale), tiles[group], axis=0)
            assert np.all(np.abs(deq - w) <= 0.5 * step + 1e-7), k  # absmax scaling, rounding
        elif re.fullmatch(HALF_PARAMS["w8"], k):
            half += 1
            assert v.dtype == jnp.float16 and np.array_equal(v, w.astype(jnp.float16)), k
        else:
            assert v.dtype == w.dtype and np.array_equal(v, w), k
    assert half > 0


@pytest.mark.full  # ~10 s: two unjitted encoder runs
def test_w8_is_rounding_only(tiny, quantized):
    """The "w8" model computes exactly the float model on its params (kernels dequantized, float16
    params widened): what it loses is the rounding, nothing else."""
    qm, qp = quantized["w8"]
    image = jnp.asarray(np.random.default_rng(2).normal(size=(1, 160, 160, 3)), jnp.float32)
    got = qm.apply({"params": qp}, image, method="encode_image")
    want = tiny.model.apply({"params": _dequantized(qp)}, image, method="encode_image")
    assert got.dtype == jnp.float32
    # The same float32 computation on the same values: equal up to XLA's operation order.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.std(want)))


def test_w8_save_load_round_trip(quantized, tmp_path):
    """A "w8" file keeps its float16 params and tiled scales, and its `quantization_of`."""
    qm, qp = quantized["w8"]
    path = str(tmp_path / "w8.safetensors")
    sam_jax.save(path, qp, qm)
    model, params = sam_jax.load(path)
    assert quantization_of(model) == quantization_of(qm)
    want = jax.tree_util.tree_leaves_with_path(qp)
    got = jax.tree_util.tree_leaves_with_path(params)
    assert len(want) == len(got)
    for (kw, w), (kg, g) in zip(want, got):
        assert kw == kg and w.dtype == g.dtype and w.shape == g.shape, kw
        np.testing.assert_array_equal(g, w)


@pytest.mark.full  # ~75 s each: compiles TinyViT / SAM-HQ in two modes and calibrated
@pytest.mark.parametrize("name", ["tiny_mobile_sam", "tiny_hq"])
def test_sam_family(name):
    """MobileSAM's TinyViT and SAM-HQ quantize through the same groups and run in SamPredictor:
    every attention and MLP matmul of the encoder's transformer blocks is int8 (TinyViT names its
    MLP fc1 / fc2), calibrated each with a static scale, and the masks have the float model's
    shapes."""
    model = sam_jax.build_sam(name)
    params = sam_jax.init_params(model, jax.random.PRNGKey(0))
    matmuls = ("qkv", "proj", "lin1", "lin2", "fc1", "fc2")
    float_kernels = [
        "/".join(k)
        for k in traverse_util.flatten_dict(params)
        if k[0] == "image_encoder" and "blocks" in "/".join(k) and k[-2] in matmuls and k[-1] == "kernel"
    ]
    image = np.random.default_rng(0).integers(0, 255, (96, 128, 3)).astype(np.uint8)
    point = dict(point_coords=np.array([[50.0, 40.0]]), point_labels=np.array([1]))
    for mode, calibration in [(mode, None) for mode in MODES] + [("w8a8", [image])]:
        qm, qp = quantize(model, params, mode, calibration=calibration)
        flat = traverse_util.flatten_dict(qp, is_leaf=lambda _, x: _is_aux(x))
        quantized = sorted("/".join(k) for k, v in flat.items() if _is_aux(v) and hasattr(v.array, "qvalue"))
        assert quantized == sorted(float_kernels) and len(quantized) >= 12, quantized
        # Calibrated: one static scale per quantized kernel's input.
        scales = sorted("/".join(k[:-1]) for k, v in flat.items() if _is_aux(v) and not hasattr(v.array, "qvalue"))
        assert scales == ([] if calibration is None else sorted(k.rsplit("/", 1)[0] for k in quantized))
        p = sam_jax.SamPredictor(qm, qp, compile_ahead=False)
        p.set_image(image)
        masks, scores, _ = p.predict(**point)
        assert masks.shape[1:] == (96, 128) and np.all(np.isfinite(scores))


@pytest.mark.full  # ~10 s: traces vit_h's init and qwix's quantization (nothing runs)
@pytest.mark.parametrize("mode", MODES)
def test_vit_h_bytes_from_shapes(mode):
    """A quantized vit_h holds at most a third of the float32 bytes (the issue's bound for files);
    computed from shapes alone (`jax.eval_shape`: no weights, nothing compiled). Measured 0.2706
    (w8) and 0.2645 (w8a8)."""
    model = sam_jax.build_sam("vit_h")
    abstract = jax.eval_shape(lambda: sam_jax.init_params(model, jax.random.PRNGKey(0)))
    qparams = jax.eval_shape(lambda p: quantize(model, p, mode)[1], abstract)
    assert param_bytes(qparams) <= param_bytes(abstract) / 3
