"""`sam-jax segment`: masks for one image from point and box prompts, written as PNGs.

    sam-jax segment IMAGE --weights W.safetensors [--point x,y[:label]]... [--box x0,y0,x1,y1]...
                    [--single] [--hq-token-only] --out DIR [--json]

Prompts are original-image pixels (x right, y down) of the image as displayed, i.e. after its EXIF
orientation is applied. Without --box, all points form one prompt. With one --box, the points
join it. Several boxes are several prompts, decoded in one batched call (points cannot be added).
Writes DIR/mask_{prompt}_{k}.png (white = mask) for every mask and DIR/overlay.png (the photo with
each prompt's best mask tinted, the prompts drawn and the scores in the corner); prints the scores,
or with --json one JSON object. --hq-token-only (SAM-HQ weights only) writes the HQ mask alone
instead of SAM's mask + the HQ mask. Usage errors: one line on stderr, exit status 2.

A re-run into the same DIR leaves exactly its own outputs: once its files are written, the
mask_P_K.png files of an earlier run that this one did not rewrite (it had more prompts, or three
masks where --single writes one) are removed. Nothing else in DIR is touched; a run that fails
removes nothing. Coordinates may be negative on the command line (`--point -5,3`), to be refused
as outside the image like any other.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from .._atomic import atomic_file
from ..predictor import SamPredictor
from .common import (
    Parser,
    UsageError,
    add_hq_token_only_argument,
    add_weights_argument,
    check_hq_token_only,
    load_weights,
    read_image,
    run_command,
)

if TYPE_CHECKING:
    from PIL import Image

# The masks segment writes; a re-run removes the ones of an earlier run that it did not rewrite.
MASK_FILE = re.compile(r"mask_\d+_\d+\.png")
PALETTE = [(30, 144, 255), (255, 140, 0), (50, 205, 50), (220, 20, 60), (148, 0, 211), (0, 206, 209)]


def _numbers(text: str, n: int, what: str) -> List[float]:
    parts = text.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != n or not all(np.isfinite(values)):
        raise UsageError(f"{what} {text!r}: expected {n} comma-separated numbers")
    return values


def parse_point(text: str) -> Tuple[float, float, int]:
    """ "x,y" or "x,y:label" (label 1 foreground, the default, or 0 background)."""
    xy, _, label = text.partition(":")
    x, y = _numbers(xy, 2, "--point")
    if label not in ("", "0", "1"):
        raise UsageError(f"--point {text!r}: the label after ':' must be 1 (foreground) or 0 (background)")
    return x, y, int(label or 1)


def parse_box(text: str) -> Tuple[float, float, float, float]:
    x0, y0, x1, y1 = _numbers(text, 4, "--box")
    return x0, y0, x1, y1


def check_prompts(
    points: List[Tuple[float, float, int]], boxes: List[Tuple[float, ...]], size: Tuple[int, int]
) -> None:
    """Fails fast (before loading weights) on prompts outside the [0, W] x [0, H] image."""
    h, w = size
    for x, y, _ in points:
        if not (0 <= x <= w and 0 <= y <= h):
            raise UsageError(f"--point {x:g},{y:g} is outside the {w}x{h} (W x H) image")
    for x0, y0, x1, y1 in boxes:
        if x1 < x0 or y1 < y0:
            raise UsageError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} has x1 < x0 or y1 < y0 (expected x0,y0,x1,y1)")
        if not (0 <= x0 and 0 <= y0 and x1 <= w and y1 <= h):
            raise UsageError(f"--box {x0:g},{y0:g},{x1:g},{y1:g} is outside the {w}x{h} (W x H) image")


def build_parser(prog: str = "sam-jax segment") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Segment an image with point and box prompts.")
    # argparse takes "-5,3" for an unknown option (its test for negative numbers is "-5" or "-.5"
    # alone), so `--point -5,3` would end in "expected one argument" instead of the real check: an
    # argument that starts like a negative number is a value. No option of segment starts so.
    p._negative_number_matcher = re.compile(r"^-\.?\d")
    p.add_argument("image", help="photo to segment (any format Pillow reads)")
    add_weights_argument(p)
    p.add_argument(
        "--point",
        action="append",
        default=[],
        type=parse_point,
        metavar="X,Y[:LABEL]",
        help="a point prompt in pixels; label 1 (default) foreground, 0 background",
    )
    p.add_argument(
        "--box",
        action="append",
        default=[],
        type=parse_box,
        metavar="X0,Y0,X1,Y1",
        help="a box prompt in pixels; repeat for several objects",
    )
    p.add_argument("--single", action="store_true", help="one mask per prompt instead of three")
    add_hq_token_only_argument(p)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def overlay(
    image: np.ndarray,
    masks: List[np.ndarray],
    scores: List[float],
    points: List[Tuple[float, float, int]],
    boxes: List[Tuple[float, ...]],
) -> Image.Image:
    """The photo with one mask per prompt tinted, points (green 1 / red 0) and boxes drawn, and
    the scores in the top-left corner."""
    from PIL import Image, ImageDraw

    out = image.astype(np.float32)
    for i, m in enumerate(masks):
        color = np.asarray(PALETTE[i % len(PALETTE)], np.float32)
        out[m] = 0.5 * out[m] + 0.5 * color
    im = Image.fromarray(out.round().astype(np.uint8))
    draw = ImageDraw.Draw(im)
    r = max(3, round(max(image.shape[:2]) / 150))
    for i, b in enumerate(boxes):
        draw.rectangle(b, outline=PALETTE[i % len(PALETTE)], width=max(2, r // 2))
    for x, y, label in points:
        draw.ellipse(
            (x - r, y - r, x + r, y + r),
            fill=(0, 200, 0) if label == 1 else (220, 0, 0),
            outline=(255, 255, 255),
            width=max(1, r // 3),
        )
    text = "\n".join(f"prompt {i}: score {s:.3f}" for i, s in enumerate(scores))
    left, top, right, bottom = draw.multiline_textbbox((6, 6), text)
    draw.rectangle((left - 4, top - 4, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.multiline_text((6, 6), text, fill=(255, 255, 255))
    return im


def run(args: argparse.Namespace) -> Dict[str, Any]:
    """Segments and writes the files; returns the JSON report. Raises UsageError on bad input."""
    from PIL import Image

    if not args.point and not args.box:
        raise UsageError("give at least one --point or --box")
    if args.point and len(args.box) > 1:
        raise UsageError("--point can be combined with at most one --box (several boxes are separate prompts)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")
    image = read_image(args.image)
    check_prompts(args.point, args.box, image.shape[:2])
    model, params = load_weights(args.weights)
    hq_token_only = check_hq_token_only(args, model)
    predictor = SamPredictor(model, params, compile_ahead=False)  # one image, one call: compile what it runs
    try:
        predictor.set_image(image)
    except ValueError as e:  # e.g. an image too elongated for the model's input frame
        raise UsageError(f"{args.image}: {e}") from None
    coords = np.array([p[:2] for p in args.point]).reshape(-1, 2) if args.point else None
    labels = np.array([p[2] for p in args.point], np.int32) if args.point else None
    multimask = not args.single
    try:
        if len(args.box) > 1:
            masks, scores, _ = predictor.predict_batch(
                boxes=np.array(args.box), multimask_output=multimask, hq_token_only=hq_token_only
            )
        else:
            box = np.array(args.box[0]) if args.box else None
            m, s, _ = predictor.predict(coords, labels, box, multimask_output=multimask, hq_token_only=hq_token_only)
            masks, scores = m[None], s[None]
    except ValueError as e:  # e.g. a point outside the image
        raise UsageError(str(e)) from None

    os.makedirs(args.out, exist_ok=True)
    report: Dict[str, Any] = {
        "image": args.image,
        "size": list(image.shape[:2]),
        "weights": args.weights,
        "multimask": multimask,
        "hq_token_only": hq_token_only,
        "prompts": [],
    }
    best_masks, best_scores = [], []
    for p in range(len(masks)):
        entry: Dict[str, Any] = {
            "points": [list(q) for q in args.point] if len(args.box) <= 1 else [],
            "box": list(args.box[p]) if args.box else None,
            "masks": [],
        }
        for k in range(masks.shape[1]):
            path = os.path.join(args.out, f"mask_{p}_{k}.png")
            with atomic_file(path) as tmp:
                Image.fromarray(masks[p, k].astype(np.uint8) * 255).save(tmp, format="PNG")
            entry["masks"].append({"file": path, "score": float(scores[p, k]), "area": int(masks[p, k].sum())})
        best = int(np.argmax(scores[p]))
        entry["best"] = best
        best_masks.append(masks[p, best])
        best_scores.append(float(scores[p, best]))
        report["prompts"].append(entry)
    report["overlay"] = os.path.join(args.out, "overlay.png")
    with atomic_file(report["overlay"]) as tmp:
        overlay(image, best_masks, best_scores, args.point, args.box).save(tmp, format="PNG")
    remove_stale_masks(args.out, {os.path.basename(m["file"]) for e in report["prompts"] for m in e["masks"]})
    return report


def remove_stale_masks(out: str, written: Set[str]) -> None:
    """Removes the files in `out` named as segment names its masks (mask_P_K.png) that are not in
    `written`: an earlier run's, which would otherwise read as this run's."""
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if name not in written and MASK_FILE.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)


def command(args: argparse.Namespace, prog: str) -> int:
    """`run`, then its report printed: as text, or with --json as one JSON object."""
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return 0
    for i, entry in enumerate(out["prompts"]):
        for k, m in enumerate(entry["masks"]):
            star = " (best)" if k == entry["best"] else ""
            print(f"prompt {i} mask {k}: score {m['score']:.4f}  area {m['area']}  {m['file']}{star}")
    print(f"overlay: {out['overlay']}")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax segment") -> int:
    return run_command(argv, prog, build_parser, command)
