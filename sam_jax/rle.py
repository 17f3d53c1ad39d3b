"""Binary masks <-> run-length encodings: the one place the project converts between them.

Uncompressed RLE (the official `mask_to_rle_pytorch` format, which pycocotools reads):
{"size": [H, W], "counts": [...]} over the mask flattened in COLUMN-major order, alternating
runs of 0s and 1s and always starting with a (possibly empty) run of 0s. Its encoder and decoder
are numpy, as the official ones, so the AMG's uncompressed output needs no extra package.

COCO's compressed RLE (a str `counts`) and COCO polygons go through pycocotools, the COCO API
itself, so they mean here exactly what they mean to COCO's tools and metrics.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Sequence, Union

import numpy as np

RLE = Dict[str, Any]
# One COCO annotation's "segmentation": polygons [[x0, y0, x1, y1, ...], ...] in pixel-corner
# coordinates, or an RLE dict with list (uncompressed) or str (compressed) counts.
Segmentation = Union[RLE, Sequence[Sequence[float]]]


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


def _mask_utils():
    try:
        from pycocotools import mask as mask_utils
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(
            "COCO RLE and polygons need pycocotools: pip install 'sam-jax[amg]' (or 'sam-jax[train]')"
        ) from None
    return mask_utils


def coco_encode_rle(rle: RLE) -> RLE:
    """Uncompressed RLE -> COCO compressed RLE with a str `counts` (needs pycocotools)."""
    h, w = rle["size"]
    out = _mask_utils().frPyObjects(rle, h, w)
    out["counts"] = out["counts"].decode("utf-8")
    return out


def coco_to_mask(segmentation: Segmentation, h: int, w: int) -> np.ndarray:
    """One COCO annotation's segmentation -> bool (h, w), as `pycocotools.coco.COCO.annToMask`.

    Polygons (pixel-corner coordinates) are filled by pycocotools, about the pixels whose centres
    lie inside: a 20 x 10 rectangle fills 200 pixels, where Pillow's fill also takes the edge
    pixels (231). Several polygons are merged. An RLE must be of size (h, w) and, when
    uncompressed, its counts must cover the h * w pixels exactly."""
    mask_utils = _mask_utils()
    if isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise ValueError(f"segmentation: an RLE needs 'size' and 'counts', got keys {sorted(segmentation)}")
        if [int(v) for v in segmentation["size"]] != [h, w]:
            raise ValueError(f"segmentation: RLE size {list(segmentation['size'])} is not the image's {[h, w]}")
        counts = segmentation["counts"]
        if isinstance(counts, (str, bytes)):
            rle = segmentation
        else:
            if sum(int(c) for c in counts) != h * w:
                raise ValueError(f"segmentation: RLE counts sum to {sum(int(c) for c in counts)}, not {h} * {w}")
            rle = mask_utils.frPyObjects(segmentation, h, w)
    else:
        polygons = [[float(v) for v in p] for p in segmentation]
        if not polygons or any(len(p) < 6 or len(p) % 2 for p in polygons):
            raise ValueError(
                "segmentation: polygons must be a non-empty list of [x0, y0, x1, y1, x2, y2, ...] "
                f"(at least 3 points each), got {[len(p) for p in polygons]} coordinates"
            )
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    # pycocotools' decode hands numpy a Cython array whose __array__ predates numpy 2's copy
    # keyword; numpy warns on every call. The warning is about pycocotools, not our use of it.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy keyword", DeprecationWarning)
        return np.asarray(mask_utils.decode(rle), bool)
