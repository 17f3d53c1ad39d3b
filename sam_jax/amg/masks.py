"""Host-side mask clean-up: small-region removal. The run-length encodings are `sam_jax.rle`'s,
re-exported for the generator and as `sam_jax.amg`'s public names."""

from __future__ import annotations

from typing import Tuple

import numpy as np

from ..rle import RLE, area_from_rle, coco_encode_rle, mask_to_rle, rle_to_mask

__all__ = [
    "EIGHT_CONNECTED",
    "RLE",
    "area_from_rle",
    "coco_encode_rle",
    "mask_to_rle",
    "remove_small_regions",
    "rle_to_mask",
]

# 8-connectivity, as the official clean-up (cv2.connectedComponentsWithStats(mask, 8)).
EIGHT_CONNECTED = np.ones((3, 3), bool)


def remove_small_regions(mask: np.ndarray, area_thresh: float, mode: str) -> Tuple[np.ndarray, bool]:
    """Fills holes ("holes") or drops islands ("islands") smaller than `area_thresh` pixels, with
    8-connected components as the official code. Returns (mask, changed). When every island is
    small, the largest one (the first in raster order on ties) is kept."""
    from scipy import ndimage

    if mode not in ("holes", "islands"):
        raise ValueError(f"mode must be 'holes' or 'islands', got {mode!r}")
    holes = mode == "holes"
    working = mask != holes  # the background for "holes", the mask itself for "islands"
    labels, n = ndimage.label(working, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    small = np.flatnonzero(sizes < area_thresh) + 1
    if small.size == 0:
        return mask, False
    if holes:
        return mask | np.isin(labels, small), True
    keep = np.setdiff1d(np.arange(1, n + 1), small)
    if keep.size == 0:
        keep = np.array([int(np.argmax(sizes)) + 1])
    return np.isin(labels, keep), True
