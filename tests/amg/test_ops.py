"""The building blocks of the automatic mask generator against the official `utils.amg` (and
torchvision's NMS semantics, through the stand-in), and the AMG decoding against `Sam.decode`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.utils import amg as official  # the torchvision stand-in is on sys.path (tests/__init__.py)
from torchvision.ops.boxes import nms as torch_nms

from sam_jax.amg import geometry, masks, ops, pipeline
from sam_jax.modeling import Sam


@pytest.mark.parametrize("n_per_side,n_layers,scale", [(32, 0, 1), (16, 2, 2), (7, 1, 3), (1, 0, 1)])
def test_point_grids_equal_official(n_per_side, n_layers, scale):
    ours = geometry.build_all_layer_point_grids(n_per_side, n_layers, scale)
    ref = official.build_all_layer_point_grids(n_per_side, n_layers, scale)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("size", [(400, 600), (512, 512), (1500, 2000), (301, 97), (5, 7)])
@pytest.mark.parametrize("n_layers,ratio", [(0, 512 / 1500), (1, 512 / 1500), (2, 0.25), (3, 0.0)])
def test_crop_boxes_equal_official(size, n_layers, ratio):
    assert geometry.generate_crop_boxes(size, n_layers, ratio) == official.generate_crop_boxes(size, n_layers, ratio)


def _blobs(rng, n, h, w):
    """Random masks with structure: thresholded smooth noise (islands and holes), plus edge cases."""
    noise = rng.standard_normal((n, h // 4 + 1, w // 4 + 1))
    smooth = np.repeat(np.repeat(noise, 4, axis=1), 4, axis=2)[:, :h, :w]
    out = smooth > 0.8
    out[0] = False  # empty
    out[1] = True  # full
    out[2, 0, 0] = True  # first pixel set: counts start with a 0-run of length 0
    return out


def test_rle_round_trip_and_official_format():
    rng = np.random.default_rng(0)
    m = _blobs(rng, 6, 37, 53)
    ref = official.mask_to_rle_pytorch(torch.from_numpy(m))
    for i in range(len(m)):
        rle = masks.mask_to_rle(m[i])
        assert rle == ref[i]  # same counts (column-major, starting with the zero run), same size
        np.testing.assert_array_equal(masks.rle_to_mask(rle), m[i])
        assert masks.area_from_rle(rle) == int(m[i].sum()) == official.area_from_rle(ref[i])


def test_coco_rle_equals_official():
    pytest.importorskip("pycocotools")
    rng = np.random.default_rng(1)
    for m in _blobs(rng, 4, 29, 41):
        rle = masks.mask_to_rle(m)
        assert masks.coco_encode_rle(rle) == official.coco_encode_rle(rle)


@pytest.mark.parametrize("mode", ["holes", "islands"])
@pytest.mark.parametrize("area", [1, 9, 40, 10_000])
def test_remove_small_regions_equals_official(mode, area):
    pytest.importorskip("cv2")
    rng = np.random.default_rng(2)
    for m in _blobs(rng, 8, 64, 80):
        got, changed = masks.remove_small_regions(m, area, mode)
        want, want_changed = official.remove_small_regions(m, area, mode)
        assert changed == want_changed
        np.testing.assert_array_equal(got, want)


def test_remove_small_regions_diagonal_is_connected():
    # Two pixels touching at a corner: one 8-connected island of 2, kept at area 2.
    m = np.zeros((5, 5), bool)
    m[1, 1] = m[2, 2] = True
    got, changed = masks.remove_small_regions(m, 2, "islands")
    assert not changed and got[1, 1] and got[2, 2]


def test_mask_boxes_equal_official():
    rng = np.random.default_rng(3)
    m = _blobs(rng, 10, 33, 47)
    m[3] = False
    m[3, 5, 7] = True  # a single pixel
    got = np.asarray(ops.mask_boxes(jnp.asarray(m)))
    want = official.batched_mask_to_box(torch.from_numpy(m)).numpy()
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(geometry.masks_to_boxes(m), want)


def test_mask_stats_equal_official_with_padding():
    """Counts over the valid top-left region only: padding logits (0 > -offset) must not count."""
    rng = np.random.default_rng(4)
    h, w, hp, wp = 30, 45, 64, 64
    logits = rng.standard_normal((6, h, w)).astype(np.float32) * 3
    logits[0] = -5.0  # nothing above -offset: stability 0 / 0 = NaN, as officially
    padded = np.zeros((6, hp, wp), np.float32)
    padded[:, :h, :w] = logits
    valid = ops.pixel_validity(jnp.array([h, w]), (hp, wp))
    for offset in (1.0, 0.25):
        hi, lo, area, box = ops.mask_stats(jnp.asarray(padded), valid, jnp.float32(offset))
        stab = np.asarray(ops.stability_score(hi, lo))
        want = official.calculate_stability_score(torch.from_numpy(logits), 0.0, offset).numpy()
        np.testing.assert_array_equal(np.isnan(stab), np.isnan(want))
        np.testing.assert_array_equal(stab[1:], want[1:])  # same integer counts, same float32 division
        np.testing.assert_array_equal(np.asarray(area), (logits > 0).sum((1, 2)))
        np.testing.assert_array_equal(
            np.asarray(box), official.batched_mask_to_box(torch.from_numpy(logits > 0)).numpy()
        )


def test_near_crop_edge_equals_official():
    rng = np.random.default_rng(5)
    orig_h, orig_w = 400, 600
    for crop in ([0, 0, 600, 400], [0, 0, 345, 236], [255, 164, 600, 400], [100, 0, 445, 236]):
        cw, ch = crop[2] - crop[0], crop[3] - crop[1]
        x = np.sort(rng.integers(0, cw, (200, 2)), axis=1)
        y = np.sort(rng.integers(0, ch, (200, 2)), axis=1)
        boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
        boxes[:10] = [0, 0, cw - 1, ch - 1]
        got = np.asarray(
            ops.near_crop_edge(
                jnp.asarray(boxes, jnp.int32), jnp.asarray(crop, jnp.int32), jnp.array([orig_h, orig_w], jnp.int32)
            )
        )
        want = official.is_box_near_crop_edge(torch.from_numpy(boxes), crop, [0, 0, orig_w, orig_h]).numpy()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.7, 1.0])
def test_nms_equals_torchvision_semantics(threshold):
    rng = np.random.default_rng(6)
    n, pad = 300, 45
    xy = rng.integers(0, 60, (n, 2))
    wh = rng.integers(0, 30, (n, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes[:20] = boxes[20:40]  # exact duplicates: IoU exactly 1
    scores = np.round(rng.uniform(0, 1, n), 2).astype(np.float32)  # many ties: stable order matters
    want = torch_nms(torch.from_numpy(boxes), torch.from_numpy(scores), threshold).numpy()
    # Padding rows (valid False) with high scores and overlapping boxes must change nothing.
    pb = np.concatenate([boxes, np.tile(boxes[:1], (pad, 1))])
    ps = np.concatenate([scores, np.full(pad, 2.0, np.float32)])
    valid = np.arange(n + pad) < n
    kept, n_kept = jax.jit(ops.nms)(pb, ps, valid, np.float32(threshold))
    np.testing.assert_array_equal(np.asarray(kept)[: int(n_kept)], want)


@pytest.fixture(scope="module")
def tiny_embedding(tiny):
    rng = np.random.default_rng(7)
    e, c = tiny.model.config.embedding_size, tiny.model.config.prompt_embed_dim
    return jnp.asarray(rng.standard_normal((1, e, e, c)), jnp.float32)


def _decode_points(model, params, embedding, coords):
    """AMG's decoding of every point: `pipeline.decode_tokens` then `pipeline.decode_masks` of all."""
    iou, hyper, tokens = pipeline.decode_tokens(model, params, embedding, coords)
    return pipeline.decode_masks(model, params, tokens, hyper), iou


def test_amg_decoder_equals_sam_decode(tiny, tiny_embedding):
    """AMG's decoding (shared image context, tokens then masks) computes Sam.decode's function:
    float32 reassociation only."""
    model, params = tiny.model, tiny.params
    rng = np.random.default_rng(8)
    coords = jnp.asarray(rng.uniform(0, model.config.image_size, (9, 2)), jnp.float32)
    low, iou = jax.jit(lambda p, e, c: _decode_points(model, p, e, c))(params, tiny_embedding, coords)
    ref_low, ref_iou = jax.jit(
        lambda p, e, c: model.apply(
            {"params": p}, e, c[:, None], jnp.ones((c.shape[0], 1), jnp.int32), method=Sam.decode
        )
    )(params, tiny_embedding, coords)
    # Summation order differs (layer 0's image side projected once by image_context, where
    # Sam.decode folds the projections into the tokens): a few float32 ulps through two attention
    # layers, i.e. ~1e-5 of the logits' spread.
    assert float(jnp.max(jnp.abs(low - ref_low)) / jnp.std(ref_low)) < 1e-4
    assert float(jnp.max(jnp.abs(iou - ref_iou))) < 1e-5


@pytest.mark.full  # ~12 CPU-s: the decode job compiled for two filters
def test_decode_job_upscales_only_points_passing_the_iou_filter(tiny, tiny_embedding):
    model, params = tiny.model, tiny.params
    rng = np.random.default_rng(9)
    coords = jnp.asarray(rng.uniform(0, model.config.image_size, (12, 2)), jnp.float32)
    full_low, full_iou = _decode_points(model, params, tiny_embedding, coords)
    thresh = float(np.median(np.asarray(full_iou).max(axis=1)))  # about half the points pass
    valid = jnp.arange(12) < 11  # the last point is padding
    low, iou = jax.jit(lambda t, p, e, c, v: pipeline.decode_job(model, t, p, e, c, v, chunk=4))(
        jnp.array([thresh, 0.0, 1.0], jnp.float32), params, tiny_embedding, coords, valid
    )
    low = np.asarray(low).reshape(12, 3, *low.shape[1:])
    passing = np.asarray(valid) & (np.asarray(full_iou) > thresh).any(axis=1)
    assert 0 < passing.sum() < 11
    np.testing.assert_allclose(np.asarray(iou).reshape(12, 3), np.asarray(full_iou), rtol=0, atol=1e-6)
    # Same decoder, chunked: equal up to float32 rounding of the batched matmuls.
    np.testing.assert_allclose(low[passing], np.asarray(full_low)[passing], rtol=0, atol=1e-5)
    assert not low[~passing].any()
