"""SamPredictor's surface on the tiny model: input coercion, state, and one test per bad input."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

import sam_jax
from sam_jax import PAD_LABEL, SamPredictor

PHOTO = np.ascontiguousarray(skimage.data.chelsea()[::3, ::3])  # 100 x 151 RGB uint8
H, W = PHOTO.shape[:2]
PT, LAB = np.array([[60.0, 40.0]]), np.array([1])
L = sam_jax.get_config("tiny").mask_input_size  # 40: side of the low-res logits


@pytest.fixture(scope="module")
def pred(tiny) -> SamPredictor:
    # Input handling: each call compiles what it runs, nothing ahead for the modes these tests
    # try once (compiling ahead is tests/test_predictor_buckets.py's subject).
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    p.set_image(PHOTO)
    return p


def _same_prediction(pred, image, **set_kwargs):
    """Sets `image` and returns its embedding and one prediction (restores PHOTO afterwards)."""
    pred.set_image(image, **set_kwargs)
    out = pred.get_image_embedding(), pred.predict(PT, LAB, return_logits=True)
    pred.set_image(PHOTO)
    return out


def _assert_same(a, b):
    # Identical uint8 pixels reach the same compiled encoder: results are bitwise equal.
    np.testing.assert_array_equal(a[0], b[0])
    for x, y in zip(a[1], b[1]):
        np.testing.assert_array_equal(x, y)


# --- accepted inputs ---


def test_state_and_sizes(tiny):
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    assert not p.is_image_set and p.original_size is None and p.input_size is None
    p.set_image(PHOTO)
    assert p.is_image_set and p.original_size == (H, W) and p.num_images == 1
    assert p.input_size == (106, 160)  # 100 * 160 / 151 + 0.5 = 106.4 -> 106, as the official rounding
    emb = p.get_image_embedding()
    assert emb.shape == (1, 48, 10, 10)  # NCHW, the official layout
    np.testing.assert_array_equal(emb, np.asarray(p.image_embeddings[0]).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(p.features, emb)
    p.reset_image()
    assert not p.is_image_set and p.original_size is None and p.features is None
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(PT, LAB)


def test_output_types(pred):
    masks, iou, low = pred.predict(PT, LAB)
    assert masks.dtype == bool and masks.shape == (3, H, W)
    assert iou.dtype == np.float32 and iou.shape == (3,)
    assert low.dtype == np.float32 and low.shape == (3, L, L)
    logits, _, _ = pred.predict(PT, LAB, multimask_output=False, return_logits=True)
    assert logits.dtype == np.float32 and logits.shape == (1, H, W)


def test_grayscale_is_replicated(pred):
    gray = PHOTO[..., 1]
    want = _same_prediction(pred, np.repeat(gray[..., None], 3, axis=2))
    _assert_same(_same_prediction(pred, gray), want)
    _assert_same(_same_prediction(pred, gray[..., None]), want)


def test_rgba_drops_alpha(pred):
    rgba = np.concatenate([PHOTO, np.full((H, W, 1), 7, np.uint8)], axis=2)
    _assert_same(_same_prediction(pred, rgba), _same_prediction(pred, PHOTO))


def test_float_image_is_rounded_to_uint8(pred):
    # round(x * 255): PHOTO / 255 must come back as exactly PHOTO.
    _assert_same(_same_prediction(pred, PHOTO / 255.0), _same_prediction(pred, PHOTO))
    _assert_same(_same_prediction(pred, (PHOTO / 255.0).astype(np.float32)), _same_prediction(pred, PHOTO))


def test_bgr_is_flipped(pred):
    _assert_same(_same_prediction(pred, PHOTO[..., ::-1], image_format="BGR"), _same_prediction(pred, PHOTO))


def test_python_lists_accepted(pred):
    small = PHOTO[:45, :70]  # still holds PT
    _assert_same(_same_prediction(pred, small.tolist()), _same_prediction(pred, small))
    a = pred.predict([[60, 40], [10.5, 20]], [1, 0], box=[5, 5, 100, 90], mask_input=np.zeros((1, L, L)).tolist())
    b = pred.predict(
        np.array([[60, 40], [10.5, 20]]),
        np.array([1, 0]),
        box=np.array([5, 5, 100, 90]),
        mask_input=np.zeros((1, L, L), np.float32),
    )
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_label_dtypes_and_box_shapes(pred):
    ref = pred.predict(PT, np.array([1], np.int64), box=np.array([5, 5, 100, 90]))
    for lab, box in [(np.array([1], np.uint8), [[5, 5, 100, 90]]), (np.array([True]), (5, 5, 100, 90))]:
        for x, y in zip(pred.predict(PT, lab, box=box), ref):
            np.testing.assert_array_equal(x, y)


def test_points_on_the_image_edge_accepted(pred):
    pred.predict([[0, 0], [W, H]], [1, 0])  # [0, W] x [0, H] is inside (continuous pixel frame)


# --- bad inputs: one test each ---

BAD_IMAGES = {
    "empty": (np.zeros((0, 10, 3), np.uint8), ValueError, "empty"),
    "chw": (np.zeros((3, 32, 48), np.uint8), ValueError, "channels-first"),
    "float_above_1": (np.full((8, 8, 3), 1.5), ValueError, r"\[0, 1\]"),
    "float_negative": (np.full((8, 8, 3), -0.1), ValueError, r"\[0, 1\]"),
    "float_nan": (np.full((8, 8, 3), np.nan), ValueError, "NaN"),
    "int_above_255": (np.full((8, 8, 3), 256, np.int64), ValueError, "0..255"),
    "complex_dtype": (np.zeros((8, 8, 3), np.complex64), TypeError, "uint8"),
    "bool_dtype": (np.zeros((8, 8, 3), bool), TypeError, "uint8"),
    "two_channels": (np.zeros((8, 8, 2), np.uint8), ValueError, "channels"),
    "four_dims": (np.zeros((1, 8, 8, 3), np.uint8), ValueError, "shape"),
    "one_dim": (np.zeros((8,), np.uint8), ValueError, "shape"),
    "ragged_list": ([[1, 2], [3]], ValueError, "image"),
    "too_elongated": (np.zeros((1, 400, 3), np.uint8), ValueError, "elongated"),  # 160 / 400 -> 0 rows
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image(pred, case):
    image, err, match = BAD_IMAGES[case]
    with pytest.raises(err, match=match):
        pred.set_image(image)
    assert pred.original_size == (H, W)  # a rejected image leaves the previous one set


@pytest.mark.parametrize("fmt", ["rgb", "Bgr", "RGBA", "", None])
def test_bad_image_format(pred, fmt):
    with pytest.raises(ValueError, match="image_format"):
        pred.set_image(PHOTO, image_format=fmt)


def test_set_images_needs_a_list(pred):
    with pytest.raises(TypeError, match="list"):
        pred.set_images(PHOTO)


def test_set_images_empty(pred):
    with pytest.raises(ValueError, match="empty"):
        pred.set_images([])


def test_model_must_be_sam(tiny):
    with pytest.raises(TypeError, match="sam_jax.Sam"):
        SamPredictor(tiny.params, tiny.params)


@pytest.mark.parametrize("flag", ["yes", 1, None])
def test_compile_ahead_must_be_a_bool(tiny, flag):
    with pytest.raises(TypeError, match="compile_ahead must be True or False"):
        SamPredictor(tiny.model, tiny.params, compile_ahead=flag)


def test_predict_before_set_image(tiny):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(tiny.model, tiny.params).predict(PT, LAB)


def test_embedding_before_set_image(tiny):
    with pytest.raises(RuntimeError, match="set_image"):
        SamPredictor(tiny.model, tiny.params).get_image_embedding()


BAD_PROMPTS = {
    "point_x_outside": (dict(point_coords=[[W + 1, 5]], point_labels=[1]), ValueError, "outside"),
    "point_y_negative": (dict(point_coords=[[5, -0.5]], point_labels=[1]), ValueError, "outside"),
    "point_nan": (dict(point_coords=[[np.nan, 5]], point_labels=[1]), ValueError, "NaN"),
    "point_inf": (dict(point_coords=[[5, np.inf]], point_labels=[1]), ValueError, "inf"),
    "points_1d": (dict(point_coords=[5, 5], point_labels=[1]), ValueError, r"\(N, 2\)"),
    "points_xyz": (dict(point_coords=[[5, 5, 5]], point_labels=[1]), ValueError, r"\(N, 2\)"),
    "points_strings": (dict(point_coords=[["a", "b"]], point_labels=[1]), TypeError, "numbers"),
    "coords_without_labels": (dict(point_coords=PT), ValueError, "point_labels"),
    "labels_without_coords": (dict(point_labels=LAB), ValueError, "point_coords"),
    "label_count_mismatch": (dict(point_coords=PT, point_labels=[1, 0]), ValueError, r"shape \(1,\)"),
    "label_2": (dict(point_coords=PT, point_labels=[2]), ValueError, "one of"),
    "label_pad_in_predict": (dict(point_coords=PT, point_labels=[PAD_LABEL]), ValueError, "one of"),
    "label_float": (dict(point_coords=PT, point_labels=[0.5]), TypeError, "integers"),
    "label_2d": (dict(point_coords=PT, point_labels=[[1]]), ValueError, "one label per point"),
    "box_flipped_x": (dict(box=[50, 5, 40, 20]), ValueError, "x1 < x0"),
    "box_flipped_y": (dict(box=[5, 50, 40, 20]), ValueError, "y1 < y0"),
    "box_length_3": (dict(box=[5, 5, 40]), ValueError, "length 4"),
    "box_two_boxes": (dict(box=[[5, 5, 40, 40], [1, 1, 2, 2]]), ValueError, "length 4"),
    "box_outside": (dict(box=[5, 5, W + 10, 40]), ValueError, "outside"),
    "box_nan": (dict(box=[5, 5, np.nan, 40]), ValueError, "NaN"),
    "mask_no_batch_axis": (dict(mask_input=np.zeros((L, L))), ValueError, rf"\(1, {L}, {L}\).*LOGITS"),
    "mask_wrong_size": (dict(mask_input=np.zeros((1, 256, 256))), ValueError, rf"\(1, {L}, {L}\)"),
    "mask_nan": (dict(mask_input=np.full((1, L, L), np.nan)), ValueError, "NaN"),
    "multimask_not_bool": (
        dict(point_coords=PT, point_labels=LAB, multimask_output="yes"),
        TypeError,
        "multimask_output",
    ),
    "return_logits_int": (dict(point_coords=PT, point_labels=LAB, return_logits=1), TypeError, "return_logits"),
    "image_index_out_of_range": (dict(point_coords=PT, point_labels=LAB, image_index=1), ValueError, "image_index"),
    "image_index_float": (dict(point_coords=PT, point_labels=LAB, image_index=0.0), TypeError, "image_index"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_bad_prompt(pred, case):
    kwargs, err, match = BAD_PROMPTS[case]
    with pytest.raises(err, match=match):
        pred.predict(**kwargs)


BAD_BATCHES = {
    "no_prompt": (dict(), ValueError, "at least one"),
    "count_mismatch": (
        dict(boxes=[[1, 1, 5, 5]] * 3, point_coords=[[[2, 2]]] * 2, point_labels=[[1]] * 2),
        ValueError,
        "counts differ",
    ),
    "single_box_shape": (dict(boxes=[1, 1, 5, 5]), ValueError, r"\(B, 4\)"),
    "ragged_length_mismatch": (dict(point_coords=[[[2, 2]], [[3, 3]]], point_labels=[[1]]), ValueError, "prompts"),
    "ragged_bad_label": (dict(point_coords=[[[2, 2]], [[3, 3]]], point_labels=[[1], [3]]), ValueError, "prompt 1"),
    "array_labels_shape": (
        dict(point_coords=np.zeros((2, 3, 2)), point_labels=np.ones((2, 2), int)),
        ValueError,
        r"\(2, 3\)",
    ),
    "mask_without_channel": (dict(mask_input=np.zeros((2, L, L))), ValueError, rf"\(B, 1, {L}, {L}\)"),
    "box_outside": (dict(boxes=[[1, 1, 5, 5], [0, 0, W, H + 3]]), ValueError, "outside"),
}


@pytest.mark.parametrize("case", sorted(BAD_BATCHES))
def test_bad_batch(pred, case):
    kwargs, err, match = BAD_BATCHES[case]
    with pytest.raises(err, match=match):
        pred.predict_batch(**kwargs)
