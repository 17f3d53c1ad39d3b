"""Device-side reductions of the automatic mask generator, with fixed shapes.

Everything here is jit-friendly: padded arrays come with validity masks, loops are `lax` loops.
Mask boxes are [x0, y0, x1, y1] INCLUSIVE pixel indices (int32), [0, 0, 0, 0] for an empty mask,
as the official `batched_mask_to_box`.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

# `is_box_near_crop_edge`: a box side within this many pixels of a crop side is "on" it.
CROP_EDGE_ATOL = 20.0


def pixel_validity(size: jax.Array, shape: Tuple[int, int]) -> jax.Array:
    """bool (Hp, Wp): True inside the top-left (h, w) = `size` (int (2,), may be traced)."""
    rows = jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return (rows < size[0]) & (cols < size[1])


def mask_stats(
    logits: jax.Array, valid: jax.Array, offset: jax.Array
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-mask reductions of full-resolution logits (K, Hp, Wp) over the valid pixels (Hp, Wp).

    Returns, each over the masks (K,): count(logit > offset), count(logit > -offset) (int32, the
    stability score's numerator and denominator at mask threshold 0), area = count(logit > 0)
    (int32) and the inclusive box (K, 4) int32 of the binary mask.
    """
    hi = jnp.sum((logits > offset) & valid, axis=(1, 2), dtype=jnp.int32)
    lo = jnp.sum((logits > -offset) & valid, axis=(1, 2), dtype=jnp.int32)
    mask = (logits > 0.0) & valid
    area = jnp.sum(mask, axis=(1, 2), dtype=jnp.int32)
    return hi, lo, area, mask_boxes(mask)


def mask_boxes(masks: jax.Array) -> jax.Array:
    """bool (K, H, W) -> int32 (K, 4) inclusive [x0, y0, x1, y1]; [0, 0, 0, 0] when empty."""
    h, w = masks.shape[-2:]
    in_row = jnp.any(masks, axis=-1)  # (K, H)
    in_col = jnp.any(masks, axis=-2)  # (K, W)
    ys = jnp.arange(h, dtype=jnp.int32)
    xs = jnp.arange(w, dtype=jnp.int32)
    top = jnp.min(jnp.where(in_row, ys, h), axis=-1)
    bottom = jnp.max(jnp.where(in_row, ys, -1), axis=-1)
    left = jnp.min(jnp.where(in_col, xs, w), axis=-1)
    right = jnp.max(jnp.where(in_col, xs, -1), axis=-1)
    box = jnp.stack([left, top, right, bottom], axis=-1)
    empty = ~jnp.any(in_row, axis=-1)
    return jnp.where(empty[:, None], 0, box)


def stability_score(hi: jax.Array, lo: jax.Array) -> jax.Array:
    """IoU of the masks thresholded at +offset and -offset: hi / lo in float32 (0 / 0 is NaN)."""
    return hi.astype(jnp.float32) / lo.astype(jnp.float32)


def near_crop_edge(boxes: jax.Array, crop_box: jax.Array, orig_size: jax.Array) -> jax.Array:
    """Boxes (K, 4) int in the CROP frame -> bool (K,): a side lies within CROP_EDGE_ATOL of the
    crop's side but not of the image's side (official `is_box_near_crop_edge`, atol 20).

    crop_box: [x0, y0, x1, y1] of the crop in the image; orig_size: (H, W) of the image.
    """
    crop = crop_box.astype(jnp.float32)
    image = jnp.stack([0, 0, orig_size[1], orig_size[0]]).astype(jnp.float32)
    absolute = (boxes + crop_box[jnp.array([0, 1, 0, 1])]).astype(jnp.float32)
    on_crop = jnp.abs(absolute - crop) <= CROP_EDGE_ATOL
    on_image = jnp.abs(absolute - image) <= CROP_EDGE_ATOL
    return jnp.any(on_crop & ~on_image, axis=-1)


def compact_order(keep: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """bool (N,) -> (indices (N,) int32 with the kept ones first, in their order; count kept)."""
    order = jnp.argsort(~keep, stable=True).astype(jnp.int32)
    return order, jnp.sum(keep, dtype=jnp.int32)


def box_iou_row(box: jax.Array, boxes: jax.Array) -> jax.Array:
    """IoU (N,) float32 of one box (4,) against boxes (N, 4), float32 [x0, y0, x1, y1], computed
    as torchvision's CPU kernel: areas (x1 - x0) * (y1 - y0), inter / (a + b - inter)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = jnp.maximum(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0.0)
    h = jnp.maximum(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0.0)
    inter = w * h
    return inter / (area + areas - inter)


def nms(boxes: jax.Array, scores: jax.Array, valid: jax.Array, iou_threshold: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """Greedy NMS with torchvision's semantics over a padded set.

    Args:
      boxes: (N, 4) float32 [x0, y0, x1, y1]; scores: (N,) float32; valid: (N,) bool (padding
        False: never kept, never suppresses); iou_threshold: scalar, a box is suppressed by a
        kept higher-scoring one when their IoU is > the threshold.

    Returns:
      (kept (N,) int32, n_kept int32): the kept indices first, by descending score with ties in
      index order (a stable sort, as torchvision), then the rest.
    """
    n = boxes.shape[0]
    boxes = boxes.astype(jnp.float32)
    order = jnp.lexsort((-scores.astype(jnp.float32), ~valid)).astype(jnp.int32)
    sorted_boxes = boxes[order]
    n_valid = jnp.sum(valid, dtype=jnp.int32)
    positions = jnp.arange(n)

    def body(i, suppressed):
        iou = box_iou_row(sorted_boxes[i], sorted_boxes)
        hit = (iou > iou_threshold) & (positions > i) & ~suppressed[i]
        return suppressed | hit

    suppressed = jax.lax.fori_loop(0, n_valid, body, positions >= n_valid)
    kept_sorted, n_kept = compact_order(~suppressed)
    return order[kept_sorted], n_kept
