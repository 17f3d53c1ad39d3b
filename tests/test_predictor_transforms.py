"""The predictor's fixed-shape pre- and post-processing against the official code paths."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import Sam as OfficialSam

from sam_jax.functional import size_bucket
from sam_jax.transforms import (
    mask_upscale_taps,
    pad_to_square,
    preprocess,
    preprocess_padded,
    resize_longest_side,
    upscale_masks,
    upscale_width_window,
)

# (H, W) original sizes: smaller and larger than the model input, both orientations, extreme
# aspect ratios, a single pixel, and sizes equal to the input side; widths just above a bucket
# boundary (257, 369, 513, 737), where the blocked width pass reads its widest windows.
SIZES = [
    (512, 512),
    (400, 600),
    (300, 200),
    (1500, 2000),
    (2000, 1500),
    (7, 1000),
    (1, 1),
    (1024, 1024),
    (1025, 3),
    (683, 1024),
    (97, 131),
    (257, 257),
    (366, 369),
    (60, 513),
    (900, 737),
]


def official_postprocess(low: np.ndarray, input_size, original_size, image_size: int) -> np.ndarray:
    """The official `Sam.postprocess_masks`, called with a stand-in holding only what it reads."""
    stub = types.SimpleNamespace(image_encoder=types.SimpleNamespace(img_size=image_size))
    return OfficialSam.postprocess_masks(stub, torch.from_numpy(low), input_size, original_size).numpy()


@pytest.mark.parametrize("image_size", [1024, 160])
@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_upscale_equals_official_postprocess(size, image_size):
    h0, w0 = size
    low_side = image_size // 4
    scale = image_size / max(h0, w0)
    input_size = (int(h0 * scale + 0.5), int(w0 * scale + 0.5))
    if 0 in input_size:
        pytest.skip("the short side resizes to 0 pixels: set_image rejects such images")
    # Logits of the size a mask decoder produces, with large smooth regions near 0.
    rng = np.random.default_rng(h0 * 7 + w0)
    low = rng.normal(size=(2, 3, low_side, low_side)).astype(np.float32) * 4
    want = official_postprocess(low, input_size, size, image_size)
    hp, wp = size_bucket(h0), size_bucket(w0)
    rows = mask_upscale_taps(low_side, image_size, input_size[0], h0, hp)
    cols = mask_upscale_taps(low_side, image_size, input_size[1], w0, wp)
    window = upscale_width_window(*cols, low_side)
    got = np.asarray(jax.jit(upscale_masks, static_argnums=3)(low, rows, cols, window))
    assert got.shape == (2, 3, hp, wp)
    # The blocked width pass (window > 0) sums the same nonzero products as the dense one, in
    # another order (and fused or not, by CPU): a few float32 ulps of the largest logit (~18 here;
    # 2 ulps seen on one x86 CPU). An absolute 1e-6 is under one ulp above 8 and failed there.
    dense = np.asarray(jax.jit(upscale_masks)(low, rows, cols))
    assert np.max(np.abs(got - dense)) <= 4 * np.finfo(np.float32).eps * np.max(np.abs(low))
    assert not got[..., h0:, :].any() and not got[..., w0:].any()  # zero padding
    got = got[..., :h0, :w0]
    # The two resizes composed in float64: float32 rounding of |logits| <~ 16 only.
    assert np.max(np.abs(got - want)) <= 4e-6
    conf = np.abs(want) > 1e-3
    assert np.array_equal(got[conf] > 0, want[conf] > 0)


def test_width_window_only_for_bucket_paddings():
    """The blocked width pass relies on size_bucket's padding (original > padded / sqrt(2)); other
    paddings get the dense pass, and a window that does not fit the taps is refused."""
    # 260 columns padded to 736 (its bucket is 368): ~1 low-res column per output column, more
    # than a window sized for the 736 bucket holds.
    cols = mask_upscale_taps(256, 1024, 1024, 260, 736)
    assert upscale_width_window(*cols, 256) == 0
    bucketed = mask_upscale_taps(256, 1024, 1024, 600, size_bucket(600))
    assert upscale_width_window(*bucketed, 256) > 0
    low = np.zeros((1, 256, 256), np.float32)
    rows = mask_upscale_taps(256, 1024, 683, 400, size_bucket(400))
    with pytest.raises(ValueError, match="width_window"):
        upscale_masks(low, rows, bucketed, -1)


def test_fixed_shape_preprocess_equals_official(tiny):
    rng = np.random.default_rng(0)
    s = tiny.model.config.image_size
    for shape in [(50, 80), (160, 160), (200, 31)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        resized = resize_longest_side(image, s)
        with torch.no_grad():
            want = tiny.torch_model.preprocess(torch.from_numpy(resized).permute(2, 0, 1)[None].float())
        want = want.numpy().transpose(0, 2, 3, 1)
        got = np.asarray(jax.jit(preprocess_padded)(pad_to_square(resized, s)[None], np.array([resized.shape[:2]])))
        # Same float32 ops ((x - mean) / std): a last-bit difference at most.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(got, np.asarray(preprocess(jnp.asarray(resized)[None], s)))
        assert not got[0, resized.shape[0] :].any() and not got[0, :, resized.shape[1] :].any()


def test_pad_to_square_rejects_oversized():
    with pytest.raises(ValueError, match="does not fit"):
        pad_to_square(np.zeros((20, 10, 3), np.uint8), 16)
