"""Host-side mask encodings and clean-up: run-length encodings and small-region removal.

Uncompressed RLE (the official `mask_to_rle_pytorch` format, which pycocotools reads):
{"size": [H, W], "counts": [...]} over the mask flattened in COLUMN-major order, alternating
runs of 0s and 1s and always starting with a (possibly empty) run of 0s.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import numpy as np

RLE = Dict[str, Any]

# 8-connectivity, as the official clean-up (cv2.connectedComponentsWithStats(mask, 8)).
EIGHT_CONNECTED = np.ones((3, 3), bool)


def mask_to_rle(mask: np.ndarray) -> RLE:
    """bool (H, W) -> uncompressed RLE (column-major counts, starting with the zero run)."""
    h, w = mask.shape
    flat = np.asarray(mask, bool).T.ravel()
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [h * w]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": counts}


def rle_to_mask(rle: RLE) -> np.ndarray:
    """Uncompressed RLE -> bool (H, W)."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(counts.size) % 2 == 1
    return np.repeat(values, counts).reshape(w, h).T.copy()


def area_from_rle(rle: RLE) -> int:
    """Number of foreground pixels of an uncompressed RLE."""
    return int(sum(rle["counts"][1::2]))


def coco_encode_rle(rle: RLE) -> RLE:
    """Uncompressed RLE -> COCO compressed RLE with a str `counts` (needs pycocotools)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("output_mode='coco_rle' needs pycocotools: pip install 'sam-jax[amg]'") from None
    h, w = rle["size"]
    out = mask_utils.frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out


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
