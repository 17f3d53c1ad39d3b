"""`sam_jax.quantize`: qwix post-training int8 quantization, on the tiny model (daily tier) and
against the official fp32 predictor on the randomised vit_b (full tier).

Daily-tier tolerances are the tiny model's measured figures (random weights, 48 channels) with a
margin; the vit_b acceptance figures are the issue's (mean mask IoU >= 0.995 for w8, >= 0.99 for
w8a8; w8 parameter bytes <= 0.3x fp32). Measured figures print with `-s`.
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import sam_jax
from sam_jax import functional as F
from sam_jax.quantize import DEFAULT_LAYERS, MODES, is_quantized, param_bytes, quantize
from tests.test_predictor_parity import prompts

FIGURES: Dict[str, Dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    for k, f in FIGURES.items():
        print(f"\n{k}: " + ", ".join(f"{n} {v:.4g}" for n, v in f.items()), end="")
    print()


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
        # One scale per output channel: the scale spans every axis but the contracted one (a
        # Dense kernel (in, out): (1, out); the upscaling's (2, 2, in, out): one per tap and out).
        contracted = [a for a, (n, s) in enumerate(zip(q.qvalue.shape, q.scale.shape)) if n != s]
        assert len(contracted) == 1 and q.scale.shape[contracted[0]] == 1, (k, q.scale.shape)
        # Dequantized kernels within half a step of the float ones (absmax scaling, rounding).
        deq = (q.qvalue.astype(jnp.float32) * q.scale).reshape(w.shape)
        assert np.all(np.abs(deq - w) <= 0.5 * np.broadcast_to(q.scale, q.qvalue.shape).reshape(w.shape) + 1e-7)
    for k in set(flat) - quantized_keys:
        assert flat[k] is floats[k] or np.array_equal(flat[k], floats[k])
    # Every group of DEFAULT_LAYERS with a stored kernel is quantized: encoder blocks, decoder MLPs,
    # hypernetworks, IoU head, upscaling.
    names = {"/".join(k) for k in quantized_keys}
    for part in (
        "attn/qkv",
        "attn/proj",
        "mlp/lin1",
        "mlp/lin2",
        "transformer/layers_0/mlp",
        "hypernetworks",
        "upscaling",
    ):
        assert any(part in n for n in names), part
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


def test_predictor(tiny, quantized):
    """SamPredictor takes (qmodel, qparams) as it takes a float model (on CPU its encoder runs in
    stages through `encode_image_layers`): set_image, predict, predict_batch (one prompt: the
    same decoder program as predict, so no second compilation here)."""
    qm, qp = quantized["w8a8"]
    image = (np.random.default_rng(1).random((120, 150, 3)) * 255).astype(np.uint8)
    pr = sam_jax.SamPredictor(qm, qp, compile_ahead=False)
    pr.set_image(image)
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
    assert is_quantized(model, params) and model.config == tiny.model.config
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
    with pytest.raises(NotImplementedError, match="calibration"):
        quantize(tiny.model, tiny.params, "w8a8", calibration=[np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="layers"):
        quantize(tiny.model, tiny.params, "w8", layers=("qkv", "nope"))
    flat = dict(traverse_util.flatten_dict(tiny.params, sep="/"))
    missing = {k: v for k, v in flat.items() if not k.endswith("mlp/lin1/kernel")}
    with pytest.raises(ValueError, match="missing image_encoder/blocks_0/mlp/lin1/kernel"):
        quantize(tiny.model, traverse_util.unflatten_dict(missing, sep="/"), "w8")
    bad = dict(flat, **{"image_encoder/blocks_0/attn/qkv/kernel": jnp.zeros((3, 3))})
    with pytest.raises(ValueError, match="qkv/kernel: shape"):
        quantize(tiny.model, traverse_util.unflatten_dict(bad, sep="/"), "w8")


def test_default_layers_are_known():
    from sam_jax.quantize import LAYERS

    for mode in MODES:
        assert set(DEFAULT_LAYERS[mode]) <= set(LAYERS)


# --- Full tier: vit_b against the official fp32 predictor on real photos. ---

# Figures measured 2026-12-05 (randomised vit_b, seed 1; the four photos below, 4 prompt kinds x
# 3 masks each; qwix 0.1.8, XLA:CPU). Each bound is the measured figure with a margin for another
# XLA / qwix version. These are regression floors, not issue 27's acceptance (mean mask IoU >=
# 0.995 for w8, >= 0.99 for w8a8), which is NOT met yet: w8 measured 0.9918, w8a8 0.9888 (w8: the
# encoder's four matmuls alone: 0.9947; the w8 output equals the float model run on the
# dequantized kernels exactly, so this is int8 per-channel rounding, not an implementation error).
MEAN_IOU = {"w8": 0.985, "w8a8": 0.98}  # regression floor: measured 0.9918 (w8), 0.9888 (w8a8)
MIN_IOU = {"w8": 0.95, "w8a8": 0.93}  # measured min 0.9729 (w8), 0.9648 (w8a8)
EMB_MEAN_ERR = {"w8": 0.05, "w8a8": 0.07}  # mean |err| / std; measured 0.034 (w8), 0.050 (w8a8)
LOGIT_MEAN_ERR = {"w8": 0.05, "w8a8": 0.07}  # low-res logits, mean |err| / std; measured 0.031 / 0.040
W8_BYTES_RATIO = 0.3  # the bound; measured 0.2985 (int8 kernels + float32 scales)


def _photos():
    import skimage.data

    return {
        "coffee_400x600": skimage.data.coffee(),
        "astronaut_512x512": skimage.data.astronaut(),
        "chelsea_300x180": np.ascontiguousarray(skimage.data.chelsea()[:, 150:330]),
        "rocket_427x380": np.ascontiguousarray(skimage.data.rocket()[:, 100:480]),
    }


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


@pytest.mark.full
def test_vit_b_bytes(vit_b):
    _, qp = quantize(vit_b.model, vit_b.params, "w8")
    ratio = param_bytes(qp) / param_bytes(vit_b.params)
    FIGURES["vit_b w8 bytes"] = {"quantized": param_bytes(qp), "fp32": param_bytes(vit_b.params), "ratio": ratio}
    assert ratio <= W8_BYTES_RATIO, ratio


@pytest.mark.full
@pytest.mark.parametrize("mode", MODES)
def test_vit_b_against_official_fp32(vit_b, mode):
    import importlib

    qm, qp = quantize(vit_b.model, vit_b.params, mode)
    ours = sam_jax.SamPredictor(qm, qp, compile_ahead=False)
    official = importlib.import_module("segment_anything").SamPredictor(vit_b.torch_model)
    ious, emb_errs, logit_errs = [], [], []
    for image in _photos().values():
        official.set_image(image)
        ours.set_image(image)
        want = official.get_image_embedding().numpy()
        got = ours.get_image_embedding()
        emb_errs.append(float(np.mean(np.abs(got - want)) / np.std(want)))
        h, w = image.shape[:2]
        for kw in prompts(h, w).values():
            ref_masks, _, ref_low = official.predict(**kw, multimask_output=True)
            masks, _, low = ours.predict(**kw, multimask_output=True)
            logit_errs.append(float(np.mean(np.abs(low - ref_low)) / np.std(ref_low)))
            ious += [_iou(masks[k], ref_masks[k]) for k in range(3)]
    fig = {
        "emb mean err/std": max(emb_errs),
        "low-res logits mean err/std": max(logit_errs),
        "mean mask IoU": float(np.mean(ious)),
        "min mask IoU": float(np.min(ious)),
        "masks": len(ious),
    }
    FIGURES[f"vit_b {mode} vs official fp32"] = fig
    assert len(ious) == 4 * 4 * 3
    assert fig["mean mask IoU"] >= MEAN_IOU[mode], fig
    assert fig["min mask IoU"] >= MIN_IOU[mode], fig
    assert fig["emb mean err/std"] <= EMB_MEAN_ERR[mode], fig
    assert fig["low-res logits mean err/std"] <= LOGIT_MEAN_ERR[mode], fig
