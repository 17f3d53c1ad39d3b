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
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .amg.checks import check_generator_args

CSV_HEADER = ("id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
              "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h")
# Generator options as (flag, type, default) in the official order.
OPTIONS: List[Tuple[str, type, Any]] = [
    ("points_per_side", int, 32), ("points_per_batch", int, 64), ("pred_iou_thresh", float, 0.88),
    ("stability_score_thresh", float, 0.95), ("stability_score_offset", float, 1.0),
    ("box_nms_thresh", float, 0.7), ("crop_n_layers", int, 0), ("crop_nms_thresh", float, 0.7),
    ("crop_overlap_ratio", float, 512 / 1500), ("crop_n_points_downscale_factor", int, 1),
    ("min_mask_region_area", int, 0),
]


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing a usage block: the CLI prints one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Automatic mask generation for an image or a folder of images.")
    p.add_argument("input", help="an image, or a folder (every file directly inside it)")
    p.add_argument("--weights", required=True, help="converted weights (.safetensors) or official .pth")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--output-mode", choices=["coco_rle", "binary_mask"], default="coco_rle",
                   help="coco_rle: NAME.json per image (needs pycocotools); binary_mask: NAME/*.png + metadata.csv")
    for name, typ, default in OPTIONS:
        p.add_argument("--" + name.replace("_", "-"), type=typ, default=default, metavar=typ.__name__.upper(),
                       help=f"generator option {name} (default {default:.4g})" if typ is float
                       else f"generator option {name} (default {default})")
    p.add_argument("--overwrite", action="store_true", help="redo images whose output already exists")
    p.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() (cluster auto-detection, or the three options "
                        "below) and process this process's share of the files")
    p.add_argument("--coordinator-address", help="with --distributed: host:port of process 0")
    p.add_argument("--num-processes", type=int, help="with --distributed: number of processes")
    p.add_argument("--process-id", type=int, help="with --distributed: this process's index")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def list_inputs(path: str) -> List[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path)
                       if not f.startswith(".") and os.path.isfile(os.path.join(path, f)))
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
    return {f: (os.path.splitext(os.path.basename(f))[0] if stems[os.path.splitext(os.path.basename(f))[0]] == 1
                else os.path.basename(f)) for f in files}


def read_image(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB with the EXIF orientation applied; raises OSError/ValueError if unreadable."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _atomic_json(obj: Any, path: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_folder(records: List[Dict[str, Any]], path: str) -> None:
    """PNG masks + metadata.csv as the official write_masks_to_folder, built in a temporary
    folder renamed into place (an existing one is replaced only after the new one is complete)."""
    from PIL import Image

    parent = os.path.dirname(path) or "."
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        rows = [CSV_HEADER]
        for i, r in enumerate(records):
            Image.fromarray(r["segmentation"].astype(np.uint8) * 255).save(os.path.join(tmp, f"{i}.png"))
            fields = [i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"], r["stability_score"],
                      *r["crop_box"]]
            rows.append(",".join(str(x) for x in fields))
        with open(os.path.join(tmp, "metadata.csv"), "w") as f:
            f.write("\n".join(rows))
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.replace(path, os.path.join(old, "x"))
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
            raise UsageError("--output-mode coco_rle needs pycocotools (pip install 'sam-jax[amg]'), "
                             "or use --output-mode binary_mask") from None
    files = list_inputs(args.input)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} exists and is not a folder")

    import jax

    explicit = {k: getattr(args, k) for k in ("coordinator_address", "num_processes", "process_id")
                if getattr(args, k) is not None}
    if explicit and not args.distributed:
        raise UsageError("--coordinator-address, --num-processes and --process-id need --distributed")
    if args.distributed:
        try:
            jax.distributed.initialize(**explicit)
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"--distributed: {e}") from None
        files = files[jax.process_index()::jax.process_count()]
    import sam_jax
    from sam_jax.amg import SamAutomaticMaskGenerator

    try:
        model, params = sam_jax.load(args.weights)
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
        for f in todo[start:start + step]:
            try:
                images.append(read_image(f))
                batch.append(f)
            except Exception as e:  # noqa: BLE001 - any decoder error means "not an image we can read"
                failed.append((f, f"{type(e).__name__}: {e}"))
                _note(bar, f"{prog}: skipped {f}: cannot read it as an image ({type(e).__name__}: {e})")
                _advance(bar)
        if not images:
            continue
        for f, records in _generate(gen, batch, images, failed, bar, prog):
            target = os.path.join(args.out, names[f] + suffix)
            if args.output_mode == "coco_rle":
                _atomic_json(records, target)
            else:
                _atomic_folder(records, target)
            written += 1
            _advance(bar, f, len(records))
    if bar is not None:
        bar.close()
    share = f" (process {jax.process_index()} of {jax.process_count()})" if args.distributed else ""
    print(f"{len(files)} images{share}: {written} written, {len(skipped)} already done (skipped; --overwrite redoes "
          f"them), {len(failed)} failed" + ("" if not failed else ": " + ", ".join(f for f, _ in failed)))
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
    try:
        args = build_parser(prog).parse_args(argv)
        return run(args, prog)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output folder is not writable
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
