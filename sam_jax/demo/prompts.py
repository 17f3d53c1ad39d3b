"""The checks of what the page sends: every field's type, range and place, each failure a
DemoError (400) that names the field, so that no input reaches the model unchecked.

Coordinates are pixels of the image as displayed (EXIF orientation applied), (x, y) with x to the
right and y down, in the continuous frame where the image covers [0, W] x [0, H].
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
from typing import Any, Dict, Iterable, Optional, Tuple

import numpy as np

from ..amg import SamAutomaticMaskGenerator
from .errors import DemoError

# Points in one prompt: the predictor's largest bucket that runs 64 prompts per call; a page
# click adds one, so this is far more than a person clicks.
MAX_POINTS = 64
# "Segment everything" on a CPU: 16 x 16 points take a few seconds with vit_b, the generator's
# own default of 32 x 32 four times that. 64 x 64 is the most the page may ask.
POINTS_PER_SIDE = 16
MAX_POINTS_PER_SIDE = 64
_GENERATOR_DEFAULTS = inspect.signature(SamAutomaticMaskGenerator.__init__).parameters
EVERYTHING_DEFAULTS = {
    "points_per_side": POINTS_PER_SIDE,
    "pred_iou_thresh": _GENERATOR_DEFAULTS["pred_iou_thresh"].default,
    "stability_score_thresh": _GENERATOR_DEFAULTS["stability_score_thresh"].default,
}


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt for `SamPredictor.predict`, checked against the image's size."""

    coords: Optional[np.ndarray]  # (N, 2) float64 (x, y) pixels, or None
    labels: Optional[np.ndarray]  # (N,) int32, 1 foreground / 0 background, or None
    box: Optional[np.ndarray]  # (4,) float64 (x0, y0, x1, y1) pixels, or None
    multimask: bool
    hq_token_only: bool = False  # SAM-HQ: the HQ mask alone


def parse_json(body: bytes) -> Any:
    """Request bytes -> a JSON value; NaN and Infinity, which Python's json reads but JSON does not
    have, are refused like any other malformed body."""

    def refuse(name: str) -> Any:
        raise DemoError(f"the request body holds {name}, which is not a JSON number")

    try:
        return json.loads(body, parse_constant=refuse)
    except DemoError:
        raise
    except RecursionError:
        raise DemoError("the request body is nested too deeply to be a request") from None
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        raise DemoError(f"the request body is not valid JSON: {e}") from None


def _show(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, list, dict)) or value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _fields(body: Any, required: Iterable[str], optional: Iterable[str]) -> Dict[str, Any]:
    if not isinstance(body, dict):
        raise DemoError(f"the request body must be a JSON object, got {_show(body)}")
    required, known = list(required), [*required, *optional]
    unknown = [k for k in body if k not in known]
    if unknown:
        raise DemoError(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {', '.join(known)}")
    missing = [k for k in required if k not in body]
    if missing:
        raise DemoError(f"missing field(s) {', '.join(missing)}")
    return body


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DemoError(f"{what} must be a number, got {_show(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int of hundreds of digits
        out = math.inf
    if not math.isfinite(out):
        raise DemoError(f"{what} must be a finite number, got {_show(value)}")
    return out


def _inside(x: float, y: float, size: Tuple[int, int], what: str) -> None:
    h, w = size
    if not (0.0 <= x <= w and 0.0 <= y <= h):
        raise DemoError(f"{what} ({x:g}, {y:g}) is outside the {w}x{h} (W x H) image")


def image_id(body: Any, fields: Iterable[str]) -> str:
    """The `id` field of a request whose fields are `id` and `fields` (checked first, so that a
    malformed request is told so even when its image is no longer held)."""
    body = _fields(body, ["id"], fields)
    if not isinstance(body["id"], str):
        raise DemoError(f"id must be the string the image upload returned, got {_show(body['id'])}")
    return body["id"]


PREDICT_FIELDS = ("points", "box", "multimask", "hq_token_only")


def predict_prompt(body: Dict[str, Any]) -> Prompt:
    """{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null, "multimask": bool,
    "hq_token_only": bool} (each optional; at least one point or a box) -> Prompt;
    `check_inside` then checks it against the image's size."""
    points = body.get("points", [])
    if points is None:
        points = []
    if not isinstance(points, list):
        raise DemoError(f"points must be a list of [x, y, label], got {_show(points)}")
    if len(points) > MAX_POINTS:
        raise DemoError(f"{len(points)} points: at most {MAX_POINTS} are taken in one prompt")
    coords, labels = [], []
    for i, p in enumerate(points):
        if not isinstance(p, list) or len(p) != 3:
            raise DemoError(f"points[{i}] must be [x, y, label], got {_show(p)}")
        x, y = _number(p[0], f"points[{i}] x"), _number(p[1], f"points[{i}] y")
        if isinstance(p[2], bool) or p[2] not in (0, 1):
            raise DemoError(f"points[{i}] label must be 1 (foreground) or 0 (background), got {_show(p[2])}")
        coords.append((x, y))
        labels.append(int(p[2]))
    box = body.get("box")
    if box is not None:
        if not isinstance(box, list) or len(box) != 4:
            raise DemoError(f"box must be [x0, y0, x1, y1] or null, got {_show(box)}")
        x0, y0, x1, y1 = (_number(v, f"box[{i}]") for i, v in enumerate(box))
        if x1 < x0 or y1 < y0:
            raise DemoError(f"box [{x0:g}, {y0:g}, {x1:g}, {y1:g}] has x1 < x0 or y1 < y0 (the top-left corner first)")
        box = np.array([x0, y0, x1, y1], np.float64)
    if not coords and box is None:
        raise DemoError("give at least one point or a box")
    multimask = body.get("multimask", True)
    if not isinstance(multimask, bool):
        raise DemoError(f"multimask must be true or false, got {_show(multimask)}")
    hq_token_only = body.get("hq_token_only", False)
    if not isinstance(hq_token_only, bool):
        raise DemoError(f"hq_token_only must be true or false, got {_show(hq_token_only)}")
    return Prompt(
        coords=np.array(coords, np.float64) if coords else None,
        labels=np.array(labels, np.int32) if coords else None,
        box=box,
        multimask=multimask,
        hq_token_only=hq_token_only,
    )


def check_inside(prompt: Prompt, size: Tuple[int, int]) -> None:
    """Every point and box corner of the prompt inside the image of size (H, W)."""
    for i, (x, y) in enumerate([] if prompt.coords is None else prompt.coords.tolist()):
        _inside(x, y, size, f"points[{i}]")
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box.tolist()
        _inside(x0, y0, size, "box corner")
        _inside(x1, y1, size, "box corner")


EVERYTHING_FIELDS = tuple(EVERYTHING_DEFAULTS)


def everything_options(body: Dict[str, Any]) -> Dict[str, Any]:
    """The generator options of a "segment everything" request: points_per_side (an int in 1..64,
    default 16), pred_iou_thresh and stability_score_thresh (numbers, the generator's defaults)."""
    out = dict(EVERYTHING_DEFAULTS)
    pps = body.get("points_per_side", POINTS_PER_SIDE)
    if isinstance(pps, bool) or not isinstance(pps, int) or not 1 <= pps <= MAX_POINTS_PER_SIDE:
        raise DemoError(f"points_per_side must be a whole number from 1 to {MAX_POINTS_PER_SIDE}, got {_show(pps)}")
    out["points_per_side"] = pps
    for name in ("pred_iou_thresh", "stability_score_thresh"):
        if name in body:
            out[name] = _number(body[name], name)
    return out
