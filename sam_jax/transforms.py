"""Pre- and post-processing with the official numerics.

Host side (numpy + Pillow): resizing the image so its longest side is the model input size, and
scaling prompt coordinates accordingly. Device side (jax): normalising and padding, and turning
low-resolution mask logits back into masks at the original image size.

Two device paths exist for each direction:
  * static shapes (`preprocess`, `postprocess_masks`): simplest, one compilation per image size;
  * fixed shapes with sizes as data (`preprocess_padded`, `upscale_masks` with `mask_upscale_taps`):
    what `SamPredictor` uses, so that new image sizes do not recompile anything.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .config import PIXEL_MEAN, PIXEL_STD


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> Tuple[int, int]:
    """(new_h, new_w) with the longest side equal to `long_side`, rounded as the official code."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with Pillow's bilinear (antialiased) resize.

    Exactly what the official `ResizeLongestSide.apply_image` does; a float resize on the device
    differs by +-1 on many pixels, so this stays on the host.
    """
    new_h, new_w = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    if new_h == 0 or new_w == 0:
        raise ValueError(
            f"an image of {image.shape[0]}x{image.shape[1]} is too elongated: its short side "
            f"would shrink to 0 pixels at a longest side of {long_side}"
        )
    return np.array(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: Tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) (x, y) pixels of the original image -> the resized frame, as float32."""
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] *= new_w / old_w
    coords[..., 1] *= new_h / old_h
    return coords.astype(np.float32)


def apply_boxes(boxes: np.ndarray, original_size: Tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) (x0, y0, x1, y1) boxes of the original image -> the resized frame."""
    boxes = np.asarray(boxes)
    return apply_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)


def normalize(images: jax.Array) -> jax.Array:
    """RGB pixels (..., 3) in 0..255 (uint8 or float) -> (x - PIXEL_MEAN) / PIXEL_STD, float32."""
    mean = jnp.asarray(PIXEL_MEAN, jnp.float32)
    std = jnp.asarray(PIXEL_STD, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """Resized RGB images (B, h, w, 3), uint8 or float in 0..255 -> normalised and zero-padded
    bottom/right to (B, image_size, image_size, 3) float32, the encoder's input."""
    x = normalize(images)
    h, w = x.shape[1:3]
    if h > image_size or w > image_size:
        raise ValueError(f"images of {h}x{w} do not fit the {image_size} model input; resize first")
    return jnp.pad(x, ((0, 0), (0, image_size - h), (0, image_size - w), (0, 0)))


def postprocess_masks(
    masks: jax.Array, input_size: Tuple[int, int], original_size: Tuple[int, int], image_size: int
) -> jax.Array:
    """Low-res logits (..., 4h, 4w) -> logits at the original size (..., H, W).

    Two bilinear steps, as the official code: up to the padded input size, crop the padding away,
    then to the original size. Both without antialiasing (the second step is a downsample for
    images under `image_size`, where an antialiased resize would flip thousands of pixels).
    """
    lead = masks.shape[:-2]
    x = jax.image.resize(masks, (*lead, image_size, image_size), method="linear", antialias=False)
    x = x[..., : input_size[0], : input_size[1]]
    return jax.image.resize(x, (*lead, *original_size), method="linear", antialias=False)


# --- Fixed-shape paths: image sizes travel as data, so nothing recompiles per image size. ---


def pad_to_square(image: np.ndarray, side: int) -> np.ndarray:
    """Resized uint8 (h, w, 3) -> uint8 (side, side, 3), zeros at the bottom/right (host side).

    The zeros are placeholders: `preprocess_padded` replaces the padding by 0 AFTER normalising.
    """
    h, w = image.shape[:2]
    if h > side or w > side:
        raise ValueError(f"an image of {h}x{w} does not fit a {side}x{side} frame; resize first")
    out = np.zeros((side, side, image.shape[2]), image.dtype)
    out[:h, :w] = image
    return out


def preprocess_padded(images: jax.Array, sizes: jax.Array) -> jax.Array:
    """Square-padded RGB images (B, S, S, 3) in 0..255 plus their resized (h, w) as an int array
    (B, 2) -> the encoder input (B, S, S, 3) float32: normalised, and 0 outside [:h, :w].

    Same values as `preprocess` on the unpadded images (the padding is zeroed after normalising,
    as officially), but with a fixed shape: `sizes` may be traced, so one compilation serves
    every image size.
    """
    x = normalize(images)
    s_h, s_w = x.shape[1:3]
    rows = jax.lax.broadcasted_iota(jnp.int32, (1, s_h, s_w, 1), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, s_h, s_w, 1), 2)
    sizes = jnp.asarray(sizes, jnp.int32)
    inside = (rows < sizes[:, 0, None, None, None]) & (cols < sizes[:, 1, None, None, None])
    return jnp.where(inside, x, 0.0)


def linear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float64 matrix of torch's bilinear resize along one axis
    (`F.interpolate(mode="bilinear", align_corners=False)`, no antialias): half-pixel centres,
    source positions below 0 clamped to 0, the upper neighbour clamped to the last index.

    Positions are rounded as torch computes them for float32 tensors: a float32 scale, then
    scale * (dst + 0.5) - 0.5 rounded once to float32 (a fused multiply-add; exact in float64
    before the cast). Rounding twice instead moves weights by up to 3e-5 on large images."""
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    dst = np.arange(out_size, dtype=np.float64)
    src = np.maximum((scale * (dst + 0.5) - 0.5).astype(np.float32), np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0.0, 1.0).astype(np.float64)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    m = np.zeros((out_size, in_size))
    np.add.at(m, (np.arange(out_size), i0), 1.0 - lam)
    np.add.at(m, (np.arange(out_size), i1), lam)
    return m


# Taps per output pixel and axis of the composed two-stage resize: an output row reads two
# adjacent rows of the (upsampled) stage-1 grid, which read at most three adjacent low-res rows.
UPSCALE_TAPS = 3


def mask_upscale_taps(
    low_size: int, image_size: int, input_len: int, original_len: int, padded_len: int
) -> Tuple[np.ndarray, np.ndarray]:
    """One axis of the official mask postprocessing as a banded linear map, for `upscale_masks`.

    The official code resizes low-res logits low_size -> image_size (bilinear), crops the padding
    to input_len, then resizes to original_len (bilinear, no antialias). Both steps are linear, so
    their composition is one (original_len, low_size) matrix with at most UPSCALE_TAPS adjacent
    non-zeros per row: each row is stored as a start index and UPSCALE_TAPS weights. Rows past
    original_len (up to padded_len) have zero weights, so outputs can be padded to a bucket size.

    Returns start (padded_len,) int32 and weights (padded_len, UPSCALE_TAPS) float32.
    """
    if not 0 < original_len <= padded_len or not 0 < input_len <= image_size:
        raise ValueError(
            f"bad upscale sizes: input {input_len} of {image_size}, original {original_len} padded to {padded_len}"
        )
    up = linear_resize_matrix(low_size, image_size)[:input_len]
    full = linear_resize_matrix(input_len, original_len) @ up  # (original_len, low_size), float64
    k = UPSCALE_TAPS
    start = np.zeros(padded_len, np.int64)
    weights = np.zeros((padded_len, k))
    nz = np.abs(full) > 0
    first = np.where(nz.any(axis=1), nz.argmax(axis=1), 0)
    start[:original_len] = np.minimum(first, low_size - k)
    rows = np.arange(original_len)
    for j in range(k):
        weights[:original_len, j] = full[rows, start[:original_len] + j]
    if not np.allclose(weights[:original_len].sum(axis=1), full.sum(axis=1), rtol=0, atol=1e-12):
        raise RuntimeError("mask upscaling is wider than UPSCALE_TAPS taps")  # cannot happen for upsampling
    return start.astype(np.int32), weights.astype(np.float32)


# Width pass of `upscale_masks`: output columns in groups of this many read one window of
# low-res columns (see `upscale_width_window`).
UPSCALE_GROUP = 32


def upscale_width_window(col_start: np.ndarray, col_weights: np.ndarray, low_len: int) -> int:
    """Host side: the static `width_window` for `upscale_masks` with these width taps (numpy,
    from `mask_upscale_taps`), or 0 for the dense width pass.

    The window is a bound that depends only on the padded output width, so every image whose
    width falls in the same `functional.size_bucket` shares one compilation: above the first
    bucket (256) an original width exceeds padded / sqrt(2), so one output column moves at most
    low_len * sqrt(2) / padded low-res columns. The taps are checked against it (other paddings
    get 0). Blocked only for padded widths up to 1024, where it was measured faster."""
    col_start, col_weights = np.asarray(col_start), np.asarray(col_weights)
    padded = len(col_start)
    if padded <= 256 or padded > 1024 or padded % UPSCALE_GROUP:
        return 0
    k = math.ceil((UPSCALE_GROUP - 1) * low_len * math.sqrt(2) / padded) + UPSCALE_TAPS + 1
    if 2 * k > low_len:
        return 0
    # Per group of output columns: the window starts at its first column's first tap (clamped to
    # fit); every column with a nonzero weight must read inside it.
    real = np.any(col_weights != 0, axis=1).reshape(-1, UPSCALE_GROUP)
    starts = col_start.astype(np.int64).reshape(-1, UPSCALE_GROUP)
    first = np.minimum(starts[:, 0], low_len - k)
    hi = np.where(real, starts, 0).max(axis=1)  # taps start in [0, low_len)
    lo = np.where(real, starts, low_len).min(axis=1)
    bad = real.any(axis=1) & ((hi + UPSCALE_TAPS - first > k) | (lo < first))
    return 0 if bad.any() else k


def upscale_masks(
    low_res: jax.Array, rows: Tuple[jax.Array, jax.Array], cols: Tuple[jax.Array, jax.Array], width_window: int = 0
) -> jax.Array:
    """Low-res logits (..., L, L) -> logits (..., Hp, Wp) at the (bucket-padded) original size.

    `rows` and `cols` are `mask_upscale_taps` for the height and width axes: (start, weights) of
    shapes (Hp,), (Hp, K) and (Wp,), (Wp, K). Equals `postprocess_masks` up to float rounding
    in [:H, :W] (the weights are composed in float64); the padding is 0. Arrays only, so one
    compilation serves every image size with the same padded output shape.

    width_window (static): `upscale_width_window(*cols_numpy, L)`, which lets the width pass read
    one window of low-res columns per group of output columns (several times less work), or 0
    for the dense pass, which any taps allow.
    """
    (row_start, row_w), (col_start, col_w) = rows, cols
    low_w, wp = low_res.shape[-1], col_start.shape[0]
    lead = low_res.shape[:-1]
    taps = jnp.arange(col_w.shape[-1])
    # Width first, on the small low-res grid, as matmuls with the banded map (faster than
    # gathering columns on CPU; the zeros add exactly nothing). HIGHEST keeps accelerators from
    # rounding the operands to bf16/tf32.
    k = width_window
    if not isinstance(k, int) or k < 0 or k > low_w or (k and wp % UPSCALE_GROUP):
        raise ValueError(f"width_window must be 0 or upscale_width_window(...) for these taps, got {k!r}")
    if k:  # each group of output columns reads a window of k low-res columns: ~low_w/k x less work
        g = wp // UPSCALE_GROUP
        first = jnp.minimum(col_start.reshape(g, UPSCALE_GROUP)[:, 0], low_w - k)  # (G,)
        window = jnp.take(low_res, (first[:, None] + jnp.arange(k)).reshape(-1), axis=-1).reshape(*lead, g, k)
        offset = (col_start.reshape(g, UPSCALE_GROUP) - first[:, None])[..., None] + taps  # (G, group, taps)
        band = jnp.sum(
            jnp.where(offset[..., None] == jnp.arange(k), col_w.reshape(g, UPSCALE_GROUP, -1, 1), 0.0), axis=-2
        )  # (G, group, k)
        x = jnp.einsum("...lgk,gok->...lgo", window, band, precision=jax.lax.Precision.HIGHEST).reshape(*lead, wp)
    else:
        band = jnp.sum(
            jnp.where(col_start[:, None, None] + taps == jnp.arange(low_w)[None, :, None], col_w[:, None, :], 0.0),
            axis=-1,
        )  # (Wp, L)
        x = jnp.einsum("...hw,xw->...hx", low_res, band, precision=jax.lax.Precision.HIGHEST)
    # Then whole rows: contiguous gathers of the (..., L, Wp) intermediate.
    return sum(jnp.take(x, row_start + j, axis=-2) * row_w[:, j, None] for j in range(row_w.shape[-1]))


class ResizeLongestSide:
    """The official `ResizeLongestSide` helper (host side, numpy) over the functions above.

    Args:
      target_length (int): the model input side S; images are resized so their longest side is S.
    """

    def __init__(self, target_length: int) -> None:
        self.target_length = int(target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) -> uint8 (h, w, 3), Pillow bilinear as officially."""
        return resize_longest_side(image, self.target_length)

    def apply_coords(self, coords: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """(..., 2) (x, y) original-image pixels -> the model-input frame, float32."""
        return apply_coords(coords, original_size, self.target_length)

    def apply_boxes(self, boxes: np.ndarray, original_size: Tuple[int, int]) -> np.ndarray:
        """(..., 4) (x0, y0, x1, y1) original-image pixels -> the model-input frame, float32."""
        return apply_boxes(boxes, original_size, self.target_length)

    @staticmethod
    def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> Tuple[int, int]:
        return get_preprocess_shape(old_h, old_w, long_side)
