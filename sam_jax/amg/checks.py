"""Argument checks of `SamAutomaticMaskGenerator`: ValueError / TypeError naming the argument."""

from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional

import numpy as np

OUTPUT_MODES = ("binary_mask", "uncompressed_rle", "coco_rle")


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _float(name: str, value: Any, low: Optional[float] = None, high: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def _grids(point_grids: Any, n_layers: int) -> List[np.ndarray]:
    if not isinstance(point_grids, (list, tuple)):
        raise TypeError(f"point_grids must be a list of (N, 2) arrays, got {type(point_grids).__name__}")
    if len(point_grids) < n_layers + 1:
        raise ValueError(
            f"point_grids has {len(point_grids)} grids but crop_n_layers={n_layers} needs "
            f"{n_layers + 1} (one per layer, layer 0 first)"
        )
    out = []
    for i, g in enumerate(point_grids):
        arr = np.asarray(g)
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"point_grids[{i}] must hold numbers, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] == 0:
            raise ValueError(f"point_grids[{i}] must have shape (N, 2) with N >= 1, got {arr.shape}")
        arr = arr.astype(np.float64)
        if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(f"point_grids[{i}] must hold (x, y) normalised to [0, 1]")
        out.append(arr)
    return out


def check_generator_args(**a: Any) -> Dict[str, Any]:
    """Validated, normalised generator arguments (see `SamAutomaticMaskGenerator`)."""
    out: Dict[str, Any] = {}
    if (a["points_per_side"] is None) == (a["point_grids"] is None):
        raise ValueError("give exactly one of points_per_side and point_grids")
    out["crop_n_layers"] = n_layers = _int("crop_n_layers", a["crop_n_layers"], 0)
    out["crop_n_points_downscale_factor"] = factor = _int(
        "crop_n_points_downscale_factor", a["crop_n_points_downscale_factor"], 1
    )
    if a["points_per_side"] is not None:
        out["points_per_side"] = pps = _int("points_per_side", a["points_per_side"], 1)
        if int(pps / factor**n_layers) < 1:
            raise ValueError(
                f"points_per_side={pps} / crop_n_points_downscale_factor={factor} ** "
                f"crop_n_layers={n_layers} leaves no point in the last crop layer"
            )
        out["point_grids"] = None
    else:
        out["points_per_side"] = None
        out["point_grids"] = _grids(a["point_grids"], n_layers)
    out["points_per_batch"] = _int("points_per_batch", a["points_per_batch"], 1)
    out["pred_iou_thresh"] = _float("pred_iou_thresh", a["pred_iou_thresh"])
    out["stability_score_thresh"] = _float("stability_score_thresh", a["stability_score_thresh"])
    out["stability_score_offset"] = _float("stability_score_offset", a["stability_score_offset"], 0.0)
    out["box_nms_thresh"] = _float("box_nms_thresh", a["box_nms_thresh"], 0.0, 1.0)
    out["crop_nms_thresh"] = _float("crop_nms_thresh", a["crop_nms_thresh"], 0.0, 1.0)
    out["crop_overlap_ratio"] = _float("crop_overlap_ratio", a["crop_overlap_ratio"], 0.0, 1.0)
    area = a["min_mask_region_area"]
    if isinstance(area, bool) or not isinstance(area, numbers.Real):
        raise TypeError(f"min_mask_region_area must be a number of pixels, got {type(area).__name__} {area!r}")
    if not math.isfinite(float(area)) or area < 0:
        raise ValueError(f"min_mask_region_area must be >= 0, got {area}")
    out["min_mask_region_area"] = area
    mode = a["output_mode"]
    if not isinstance(mode, str) or mode not in OUTPUT_MODES:
        raise ValueError(f"output_mode must be one of {list(OUTPUT_MODES)}, got {mode!r}")
    out["output_mode"] = mode
    return out
