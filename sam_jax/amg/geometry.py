"""Host-side geometry of the automatic mask generator: point grids, crop boxes, box formats.

Conventions (as the official `segment_anything.utils.amg`):
  * point grids are (N, 2) float64 (x, y) in [0, 1], scaled by a crop's (w, h) to crop pixels;
  * crop boxes are [x0, y0, x1, y1] ints of the original image, x1 / y1 exclusive;
  * mask boxes are [x0, y0, x1, y1] inclusive pixel indices (x1 is the last column of the mask).
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import numpy as np


def build_point_grid(n_per_side: int) -> np.ndarray:
    """An n x n grid of cell centres in [0, 1]^2: (n * n, 2) float64 (x, y), x varying fastest."""
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1.0 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def build_all_layer_point_grids(n_per_side: int, n_layers: int, scale_per_layer: int) -> List[np.ndarray]:
    """One grid per crop layer: layer i has int(n_per_side / scale_per_layer ** i) points a side."""
    return [build_point_grid(int(n_per_side / (scale_per_layer**i))) for i in range(n_layers + 1)]


def generate_crop_boxes(
    im_size: Tuple[int, int], n_layers: int, overlap_ratio: float
) -> Tuple[List[List[int]], List[int]]:
    """Crop boxes [x0, y0, x1, y1] (ints, original-image pixels) and their layer index.

    Layer 0 is the whole image; layer i >= 1 has (2 ** i) ** 2 overlapping crops, ordered with
    x0 as the outer loop (column by column), as the official generator.
    """
    im_h, im_w = im_size
    short_side = min(im_h, im_w)
    boxes, layers = [[0, 0, im_w, im_h]], [0]

    def crop_len(orig_len: int, n_crops: int, overlap: int) -> int:
        return int(math.ceil((overlap * (n_crops - 1) + orig_len) / n_crops))

    for i_layer in range(n_layers):
        n = 2 ** (i_layer + 1)
        overlap = int(overlap_ratio * short_side * (2 / n))
        crop_w, crop_h = crop_len(im_w, n, overlap), crop_len(im_h, n, overlap)
        x0s = [int((crop_w - overlap) * i) for i in range(n)]
        y0s = [int((crop_h - overlap) * i) for i in range(n)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append([x0, y0, min(x0 + crop_w, im_w), min(y0 + crop_h, im_h)])
                layers.append(i_layer + 1)
    return boxes, layers


def box_xyxy_to_xywh(box: Sequence[int]) -> List[int]:
    """[x0, y0, x1, y1] -> [x0, y0, x1 - x0, y1 - y0] (for mask boxes, whose x1 is inclusive, the
    width is one less than the pixel count, as the official records)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """Host version of the device reduction: bool (N, H, W) -> int64 (N, 4) inclusive
    [x0, y0, x1, y1]; an empty mask gives [0, 0, 0, 0]."""
    n = masks.shape[0]
    out = np.zeros((n, 4), np.int64)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    for i in range(n):
        r, c = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if r.size:
            out[i] = (c[0], r[0], c[-1], r[-1])
    return out
