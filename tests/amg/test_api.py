"""SamAutomaticMaskGenerator's surface: argument checks, output modes, records, embeddings, batches."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import skimage.data

from sam_jax import SamPredictor
from sam_jax.amg import SamAutomaticMaskGenerator, mask_to_rle, rle_to_mask

# Loose settings for the tiny model: its stability scores at offset 1 are ~0 and its masks all
# span the image (identical boxes: any NMS threshold below 1 keeps one).
LOOSE = dict(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


@pytest.fixture(scope="module")
def image():
    return skimage.data.chelsea()[:200, :260]


@pytest.fixture(scope="module")
def binary_records(tiny, image):
    return SamAutomaticMaskGenerator(tiny.model, tiny.params, **LOOSE).generate(image)


BAD_ARGS = [
    (dict(points_per_side=0), ValueError, "points_per_side"),
    (dict(points_per_side=3.0), TypeError, "points_per_side"),
    (dict(points_per_side=True), TypeError, "points_per_side"),
    (dict(points_per_side=None), ValueError, "point_grids"),
    (dict(point_grids=[np.zeros((4, 2))]), ValueError, "exactly one"),
    (dict(points_per_side=None, point_grids=[np.full((4, 2), 1.5)]), ValueError, "point_grids[0]"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 3))]), ValueError, "point_grids[0]"),
    (dict(points_per_side=None, point_grids=[np.zeros((4, 2))], crop_n_layers=1), ValueError, "point_grids"),
    (dict(points_per_side=None, point_grids=np.zeros((4, 2))), TypeError, "point_grids"),
    (dict(points_per_batch=0), ValueError, "points_per_batch"),
    (dict(pred_iou_thresh="high"), TypeError, "pred_iou_thresh"),
    (dict(pred_iou_thresh=float("nan")), ValueError, "pred_iou_thresh"),
    (dict(stability_score_thresh=None), TypeError, "stability_score_thresh"),
    (dict(stability_score_offset=-1.0), ValueError, "stability_score_offset"),
    (dict(box_nms_thresh=1.5), ValueError, "box_nms_thresh"),
    (dict(crop_nms_thresh=-0.1), ValueError, "crop_nms_thresh"),
    (dict(crop_n_layers=-1), ValueError, "crop_n_layers"),
    (dict(crop_overlap_ratio=2.0), ValueError, "crop_overlap_ratio"),
    (dict(crop_n_points_downscale_factor=0), ValueError, "crop_n_points_downscale_factor"),
    (dict(points_per_side=4, crop_n_layers=3, crop_n_points_downscale_factor=2), ValueError, "no point"),
    (dict(min_mask_region_area=-5), ValueError, "min_mask_region_area"),
    (dict(min_mask_region_area="10"), TypeError, "min_mask_region_area"),
    (dict(output_mode="rle"), ValueError, "output_mode"),
    (dict(devices=[]), TypeError, "devices"),
]


@pytest.mark.parametrize("kwargs,exc,needle", BAD_ARGS, ids=[str(a[0])[:60] for a in BAD_ARGS])
def test_bad_arguments_name_the_argument(tiny, kwargs, exc, needle):
    with pytest.raises(exc, match=None) as info:
        SamAutomaticMaskGenerator(tiny.model, tiny.params, **kwargs)
    assert needle in str(info.value)


def test_model_must_be_sam(tiny):
    with pytest.raises(TypeError, match="model"):
        SamAutomaticMaskGenerator(tiny.torch_model, tiny.params)


@pytest.mark.parametrize(
    "bad", [np.zeros((0, 5, 3), np.uint8), np.zeros((3, 40, 50), np.uint8), np.full((20, 20, 3), 2.0)]
)
def test_bad_images_raise_value_error(tiny, bad):
    with pytest.raises(ValueError, match="image"):
        SamAutomaticMaskGenerator(tiny.model, tiny.params, points_per_side=2).generate(bad)


def test_records_schema(binary_records, image):
    assert len(binary_records) >= 3
    h, w = image.shape[:2]
    for r in binary_records:
        assert set(r) == {
            "segmentation",
            "area",
            "bbox",
            "predicted_iou",
            "point_coords",
            "stability_score",
            "crop_box",
        }
        seg = r["segmentation"]
        assert seg.dtype == bool and seg.shape == (h, w)
        assert type(r["area"]) is int and r["area"] == int(seg.sum())
        assert len(r["bbox"]) == 4 and all(type(v) is int for v in r["bbox"])
        ys, xs = np.nonzero(seg)
        assert r["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]  # XYWH, inclusive
        assert type(r["predicted_iou"]) is float and type(r["stability_score"]) is float
        ((x, y),) = r["point_coords"]
        assert type(x) is float and 0 <= x <= w and 0 <= y <= h
        assert r["crop_box"] == [0, 0, w, h]


# pycocotools' own decode wraps its result in a Cython class whose __array__ predates numpy 2's
# copy keyword (pycocotools/mask.py:91): its warning, not ours.
@pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning:pycocotools"
)
@pytest.mark.full  # ~8 CPU-s: two more generator runs
def test_output_modes_agree(tiny, image, binary_records):
    pytest.importorskip("pycocotools")
    from pycocotools import mask as mask_utils

    rle = SamAutomaticMaskGenerator(tiny.model, tiny.params, output_mode="uncompressed_rle", **LOOSE).generate(image)
    coco = SamAutomaticMaskGenerator(tiny.model, tiny.params, output_mode="coco_rle", **LOOSE).generate(image)
    json.dumps(coco)  # COCO records are JSON-serialisable as they are
    assert len(rle) == len(coco) == len(binary_records)
    for b, u, c in zip(binary_records, rle, coco):
        m = b["segmentation"]
        assert u["segmentation"] == mask_to_rle(m)
        assert u["segmentation"]["counts"][0] == (0 if m[0, 0] else u["segmentation"]["counts"][0])
        np.testing.assert_array_equal(rle_to_mask(u["segmentation"]), m)
        np.testing.assert_array_equal(mask_utils.decode(c["segmentation"]).astype(bool), m)
        assert isinstance(c["segmentation"]["counts"], str)
        for k in ("area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"):
            assert b[k] == u[k] == c[k]


def test_generate_from_embedding_equals_generate(tiny, image, binary_records):
    gen = SamAutomaticMaskGenerator(tiny.model, tiny.params, **LOOSE)
    predictor = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    predictor.set_image(image)
    for emb in (predictor.image_embeddings[0], predictor.get_image_embedding()):  # NHWC device, NCHW numpy
        got = gen.generate_from_embedding(emb, image.shape[:2])
        assert len(got) == len(binary_records)
        # The predictor's encoder and ours are separate compilations: float32 rounding may flip
        # a pixel whose logit is within ~1e-6 of 0, and move scores by ~1e-7.
        for a, b in zip(got, binary_records):
            sa, sb = a["segmentation"], b["segmentation"]
            assert np.count_nonzero(sa & sb) / np.count_nonzero(sa | sb) >= 0.999
            assert np.abs(np.subtract(a["bbox"], b["bbox"])).max() <= 1 and a["point_coords"] == b["point_coords"]
            assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5


def test_generate_from_embedding_checks(tiny):
    gen = SamAutomaticMaskGenerator(tiny.model, tiny.params, points_per_side=2)
    e, c = tiny.model.config.embedding_size, tiny.model.config.prompt_embed_dim
    with pytest.raises(ValueError, match="image_embedding"):
        gen.generate_from_embedding(np.zeros((1, e, e, c + 1)), (100, 100))
    with pytest.raises(ValueError, match="original_size"):
        gen.generate_from_embedding(np.zeros((1, e, e, c)), (100, 0))
    with pytest.raises(ValueError, match="hq_features: only a SAM-HQ model"):
        gen.generate_from_embedding(np.zeros((1, e, e, c)), (100, 100), np.zeros((1, 4 * e, 4 * e, c // 8)))
    crops = SamAutomaticMaskGenerator(tiny.model, tiny.params, points_per_side=2, crop_n_layers=1)
    with pytest.raises(ValueError, match="crop_n_layers"):
        crops.generate_from_embedding(np.zeros((1, e, e, c)), (100, 100))


@pytest.mark.full  # ~10 CPU-s: three more generator runs compiled
def test_batch_equals_single_and_points_per_batch_does_not_matter(tiny, image, binary_records):
    """generate_batch on mixed sizes equals generate on each; a points_per_batch that does not
    divide the grid (padding in the last batch) and forces the survivor buffer to grow twice gives
    the same records."""
    other = skimage.data.astronaut()[::3, ::2]
    small = SamAutomaticMaskGenerator(tiny.model, tiny.params, **{**LOOSE, "points_per_batch": 5})
    batch = small.generate_batch([image, other])
    single = SamAutomaticMaskGenerator(tiny.model, tiny.params, **LOOSE).generate(other)
    # Decoder batches of 5 vs 64 points round differently (float32): a logit within ~1e-6 of 0
    # may flip a pixel, hence mask IoU >= 0.999 rather than equality.
    for got, want in ((batch[0], binary_records), (batch[1], single)):
        assert len(got) == len(want) > 0
        for a, b in zip(got, want):
            sa, sb = a["segmentation"], b["segmentation"]
            assert np.count_nonzero(sa & sb) / np.count_nonzero(sa | sb) >= 0.999
            assert a["point_coords"] == b["point_coords"]
            assert abs(a["stability_score"] - b["stability_score"]) <= 1e-4
            assert abs(a["predicted_iou"] - b["predicted_iou"]) < 1e-5


def test_grayscale_and_float_images(tiny, image):
    gen = SamAutomaticMaskGenerator(tiny.model, tiny.params, **LOOSE)
    gray = image[..., 1]
    a = gen.generate(gray)
    b = gen.generate(np.repeat(gray[..., None], 3, axis=-1).astype(np.float32) / 255.0)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["segmentation"], y["segmentation"])


def test_devices_argument(tiny, image):
    gen = SamAutomaticMaskGenerator(tiny.model, tiny.params, devices=jax.devices()[:1], **LOOSE)
    assert gen.devices == jax.devices()[:1]
    assert len(gen.generate(image)) > 0
