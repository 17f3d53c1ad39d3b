"""`sam-jax amg`: automatic masks for an image or a folder of images.

    sam-jax amg INPUT --weights W.safetensors --out DIR [--output-mode coco_rle|binary_mask]
                [--points-per-side 32] [--pred-iou-thresh 0.88] ... [--overwrite] [--distributed]

Like the official scripts/amg.py: per image, coco_rle writes DIR/NAME.json (the list of official
records, segmentations as COCO RLE), binary_mask writes DIR/NAME/{0,1,...}.png plus metadata.csv.
NAME is the file name without its extension (with it, when two inputs would collide). Every
output appears atomically (temporary name, then os.replace): an interrupted run leaves no half
file, and a re-run skips images whose output exists unless --overwrite. An unreadable image is
reported and skipped; the others continue, and the summary names it (exit status 1).
Images are spread over the local JAX devices; --distributed calls jax.distributed.initialize()
and each process takes every process_count-th file (in sorted order). Usage errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._atomic import atomic_file, atomic_folder
from ..amg import SamAutomaticMaskGenerator
from ..amg.checks import check_generator_args
from ..checkpoints import load
from .common import ImageError, Parser, UsageError, read_image, run_command

CSV_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def generator_options() -> List[Tuple[str, type, Any]]:
    """The generator's numeric arguments as (name, int or float, default), in its order (the
    official one): every argument annotated int or float (or Optional of one) with a default
    other than None. Read from its signature, so the flags follow the generator."""
    sig = inspect.signature(SamAutomaticMaskGenerator.__init__, eval_str=True)
    out = []
    for name, p in sig.parameters.items():
        union = typing.get_origin(p.annotation) is typing.Union
        kinds = typing.get_args(p.annotation) if union else (p.annotation,)
        numeric = [k for k in kinds if k in (int, float)]
        if (
            len(numeric) == 1
            and all(k in (int, float, type(None)) for k in kinds)
            and p.default is not inspect.Parameter.empty
            and p.default is not None
        ):
            out.append((name, numeric[0], p.default))
    return out


OPTIONS = generator_options()


def build_parser(prog: str = "sam-jax amg") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Automatic mask generation for an image or a folder of images.")
    p.add_argument("input", help="an image, or a folder (every file directly inside it)")
    p.add_argument("--weights", required=True, help="converted weights (.safetensors) or official .pth")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument(
        "--output-mode",
        choices=["coco_rle", "binary_mask"],
        default="coco_rle",
        help="coco_rle: NAME.json per image (needs pycocotools); binary_mask: NAME/*.png + metadata.csv",
    )
    for name, typ, default in OPTIONS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=typ,
            default=default,
            metavar=typ.__name__.upper(),
            help=f"generator option {name} (default {default:.4g})"
            if typ is float
            else f"generator option {name} (default {default})",
        )
    p.add_argument("--overwrite", action="store_true", help="redo images whose output already exists")
    p.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (cluster auto-detection, or the three options "
        "below) and process this process's share of the files",
    )
    p.add_argument("--coordinator-address", help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def list_inputs(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(
            os.path.join(path, f)
            for f in os.listdir(path)
            if not f.startswith(".") and os.path.isfile(os.path.join(path, f))
        )
        if not files:
            raise UsageError(f"folder {path} holds no files")
        return files
    if os.path.isfile(path):
        return [path]
    raise UsageError(f"no such image or folder: {path}")


def output_names(files: Sequence[str]) -> Dict[str, str]:
    """File -> output base name: the stem, or the whole file name where stems collide."""
    stems: Dict[str, int] = {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        stems[stem] = stems.get(stem, 0) + 1
    return {
        f: (
            os.path.splitext(os.path.basename(f))[0]
            if stems[os.path.splitext(os.path.basename(f))[0]] == 1
            else os.path.basename(f)
        )
        for f in files
    }


def write_json(records: List[Dict[str, Any]], path: str) -> None:
    """The records as one JSON list (coco_rle), as the official scripts/amg.py writes them."""
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(records, f)


def write_folder(records: List[Dict[str, Any]], path: str) -> None:
    """PNG masks + metadata.csv as the official write_masks_to_folder (binary_mask)."""
    from PIL import Image

    with atomic_folder(path) as tmp:
        rows = [CSV_HEADER]
        for i, r in enumerate(records):
            Image.fromarray(r["segmentation"].astype(np.uint8) * 255).save(os.path.join(tmp, f"{i}.png"))
            fields = [
                i,
                r["area"],
                *r["bbox"],
                *r["point_coords"][0],
                r["predicted_iou"],
                r["stability_score"],
                *r["crop_box"],
            ]
            rows.append(",".join(str(x) for x in fields))
        with open(os.path.join(tmp, "metadata.csv"), "w") as f:
            f.write("\n".join(rows))


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="image", disable=disable, file=sys.stderr)


def run(args: argparse.Namespace, prog: str) -> int:
    opts = {name: getattr(args, name) for name, _, _ in OPTIONS}
    try:
        check_generator_args(point_grids=None, output_mode=args.output_mode, **opts)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if args.output_mode == "coco_rle":
        try:
            import pycocotools.mask  # noqa: F401
        except ImportError:
            raise UsageError(
                "--output-mode coco_rle needs pycocotools (pip install 'sam-jax[amg]'), "
                "or use --output-mode binary_mask"
            ) from None
    files = list_inputs(args.input)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")

    import jax

    explicit = {
        k: getattr(args, k)
        for k in ("coordinator_address", "num_processes", "process_id")
        if getattr(args, k) is not None
    }
    if explicit and not args.distributed:
        raise UsageError("--coordinator-address, --num-processes and --process-id need --distributed")
    if args.distributed:
        try:
            jax.distributed.initialize(**explicit)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--distributed: {e}") from None
        files = files[jax.process_index() :: jax.process_count()]
    try:
        model, params = load(args.weights)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    os.makedirs(args.out, exist_ok=True)
    gen = SamAutomaticMaskGenerator(model, params, output_mode=args.output_mode, **opts)
    names = output_names(files)
    suffix = ".json" if args.output_mode == "coco_rle" else ""
    todo, skipped, failed, written = [], [], [], 0
    for f in files:
        if not args.overwrite and os.path.exists(os.path.join(args.out, names[f] + suffix)):
            skipped.append(f)
        else:
            todo.append(f)
    bar = _progress(len(todo), args.no_progress)
    step = len(gen.devices)
    for start in range(0, len(todo), step):
        batch, images = [], []
        for f in todo[start : start + step]:
            try:
                images.append(read_image(f))
                batch.append(f)
            except ImageError as e:
                failed.append((f, str(e)))
                _note(bar, f"{prog}: skipped: {e}")
                _advance(bar)
        if not images:
            continue
        for f, records in _generate(gen, batch, images, failed, bar, prog):
            target = os.path.join(args.out, names[f] + suffix)
            (write_json if args.output_mode == "coco_rle" else write_folder)(records, target)
            written += 1
            _advance(bar, f, len(records))
    if bar is not None:
        bar.close()
    share = f" (process {jax.process_index()} of {jax.process_count()})" if args.distributed else ""
    print(
        f"{len(files)} images{share}: {written} written, {len(skipped)} already done (skipped; --overwrite redoes "
        f"them), {len(failed)} failed" + ("" if not failed else ": " + ", ".join(f for f, _ in failed))
    )
    return 1 if failed else 0


def _generate(gen, batch: List[str], images: List[np.ndarray], failed: List[Tuple[str, str]], bar, prog: str):
    """(file, records) for every image that the generator accepts; a batch that fails is redone
    image by image so that one bad image (e.g. too elongated to resize) fails alone."""
    try:
        yield from zip(batch, gen.generate_batch(images))
        return
    except ValueError:
        if len(images) == 1:
            pass
        else:
            for f, im in zip(batch, images):
                yield from _generate(gen, [f], [im], failed, bar, prog)
            return
    try:
        yield batch[0], gen.generate(images[0])
    except ValueError as e:
        failed.append((batch[0], str(e)))
        _note(bar, f"{prog}: skipped {batch[0]}: {e}")
        _advance(bar)


def _note(bar, message: str) -> None:
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _advance(bar, path: Optional[str] = None, n_masks: int = 0) -> None:
    if bar is not None:
        bar.update(1)
    elif path is not None:
        print(f"{path}: {n_masks} masks", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax amg") -> int:
    return run_command(argv, prog, build_parser, run)
