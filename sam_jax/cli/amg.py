"""`sam-jax amg`: automatic masks for an image or a folder of images.

    sam-jax amg INPUT --weights W.safetensors --out DIR [--output-mode coco_rle|binary_mask]
                [--points-per-side 32] [--pred-iou-thresh 0.88] ... [--hq-token-only] [--overwrite]
                [--distributed]

As the official scripts/amg.py: per image, coco_rle writes DIR/FILE.json (the list of official
records, segmentations as COCO RLE), binary_mask writes DIR/FILE/{0,1,...}.png plus metadata.csv.
--hq-token-only (SAM-HQ weights only): every mask is the HQ mask alone instead of SAM's + the HQ
mask (the generator's hq_token_only).
FILE is the image's whole file name, extension kept (photo.jpg -> photo.jpg.json), where the
official script drops it and photo.jpg and photo.png would share one output: names in one folder
are distinct, so each output belongs to one image whatever else the folder holds and however many
processes share it. (Outputs named the older way, photo.json, are left as they are: a note
counts them, and their images are done again under the new name.)

Every output appears atomically (`sam_jax._atomic`: a temporary named after the output, then
os.replace): an interrupted run leaves no half file, and a re-run skips images whose output exists
unless --overwrite, after removing the temporaries that a killed run left for these images'
outputs. An unreadable image is reported and skipped; the others continue, and the summary names it
(exit status 1); so is an image whose output name is taken by something else (a file where its
binary_mask folder goes), which is never replaced. Images are spread over the local JAX devices;
--distributed calls jax.distributed.initialize() and each process takes every process_count-th file
(in sorted order): it alone writes their outputs and removes their stale temporaries, never another
process's. Usage errors: one line on stderr, exit 2.
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

from .._atomic import atomic_file, atomic_folder, remove_stale
from ..amg import SamAutomaticMaskGenerator
from ..amg.checks import check_generator_args
from .common import (
    ImageError,
    Parser,
    UsageError,
    add_hq_token_only_argument,
    add_weights_argument,
    check_hq_token_only,
    list_inputs,
    load_weights,
    read_image,
    run_command,
)

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
    add_weights_argument(p)
    p.add_argument(
        "--out",
        required=True,
        help="output folder (created if missing); each image's output is named after its whole file name: "
        "photo.jpg -> photo.jpg.json or photo.jpg/",
    )
    p.add_argument(
        "--output-mode",
        choices=["coco_rle", "binary_mask"],
        default="coco_rle",
        help="coco_rle: FILE.json per image (needs pycocotools); binary_mask: FILE/*.png + metadata.csv",
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
    add_hq_token_only_argument(p)
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


def output_path(out: str, image: str, output_mode: str) -> str:
    """Where `image`'s output goes: OUT/FILE.json (coco_rle) or the folder OUT/FILE (binary_mask),
    FILE being the image's whole file name. A function of that name alone, so it is the same for
    any process count and any folder contents, and distinct for the files of one folder."""
    return os.path.join(out, os.path.basename(image) + (".json" if output_mode == "coco_rle" else ""))


def _old_name(out: str, image: str, output_mode: str) -> str:
    """The output name earlier versions gave most images: the file name without its extension."""
    stem = os.path.splitext(os.path.basename(image))[0]
    return output_path(out, stem, output_mode)


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
    if args.output_mode == "binary_mask" and os.path.realpath(args.out) == os.path.realpath(
        os.path.dirname(os.path.abspath(files[0]))
    ):
        raise UsageError(
            f"--out {args.out} is the images' own folder, where binary_mask's output folders (named like the "
            "images) cannot go: choose another --out"
        )
    all_outputs = {output_path(args.out, f, args.output_mode) for f in files}  # every process's, for the note below

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
    model, params = load_weights(args.weights)
    hq_token_only = check_hq_token_only(args, model)
    os.makedirs(args.out, exist_ok=True)
    gen = SamAutomaticMaskGenerator(model, params, output_mode=args.output_mode, hq_token_only=hq_token_only, **opts)
    targets = {f: output_path(args.out, f, args.output_mode) for f in files}
    # This process alone writes these outputs: what their writers left when killed is stale.
    stale = remove_stale(targets.values())
    if stale:
        _note(None, f"{prog}: removed {len(stale)} temporaries that an interrupted run left: {', '.join(stale)}")
    todo, skipped, failed, written = [], [], [], 0
    for f in files:
        target, folder = targets[f], args.output_mode == "binary_mask"
        if os.path.lexists(target) and os.path.isdir(target) != folder:
            failed.append((f, f"{target} exists and is not a {'folder' if folder else 'file'}: not replaced"))
            _note(None, f"{prog}: skipped {f}: {failed[-1][1]}")
        elif not args.overwrite and os.path.exists(target):
            skipped.append(f)
        else:
            todo.append(f)
    old = [(f, _old_name(args.out, f, args.output_mode)) for f in todo]
    old = [(f, o) for f, o in old if o not in all_outputs and os.path.lexists(o)]
    if old:
        _note(
            None,
            f"{prog}: note: {len(old)} image(s) have an output under the name earlier versions gave it, without the "
            f"image's extension (e.g. {old[0][1]} for {old[0][0]}): left as it is; the image is done again as "
            f"{targets[old[0][0]]}",
        )
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
            (write_json if args.output_mode == "coco_rle" else write_folder)(records, targets[f])
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
