"""`sam-jax quantize`: int8 post-training quantization of SAM weights into a sam_jax file.

    sam-jax quantize IN OUT.safetensors [--mode w8|w8a8] [--calibration DIR] [--overwrite]

IN: weights as every subcommand takes them (vit_b, a Hugging Face id, a converted .safetensors
file, an official .pth, a Hugging Face folder). OUT: a sam_jax .safetensors file holding int8
kernels and float32 scales, its metadata recording the mode; `sam_jax.load(OUT)` returns the
quantized model (no torch needed) and every subcommand takes OUT as `--weights`. An existing OUT
is kept unless --overwrite. Needs qwix (the `quant` extra). `--calibration DIR` (with --mode
w8a8): static activation scales calibrated on the images in DIR (every file in it must be an
image; a few photos like the ones to segment), instead of dynamic per-token ones; see
`sam_jax.quantize` for what they cost in fidelity and buy in speed.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import List, Optional, Sequence

import numpy as np

from .common import Parser, UsageError, list_inputs, load_weights, read_image, run_command

MODES = ("w8", "w8a8")  # sam_jax.quantize.MODES, without importing qwix for --help


def build_parser(prog: str = "sam-jax quantize") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Quantize SAM weights to int8 (post-training, no data needed) into a sam_jax .safetensors file.",
    )
    p.add_argument(
        "src",
        metavar="IN",
        help="vit_b, vit_l, vit_h, a Hugging Face SAM id, or a path: converted .safetensors, official .pth, "
        "Hugging Face folder",
    )
    p.add_argument("dst", metavar="OUT", help="the quantized weights: a .safetensors file")
    p.add_argument(
        "--mode",
        default="w8",
        choices=MODES,
        help="w8: int8 weights, float compute (the memory mode, default); w8a8: int8 weights and dynamic "
        "int8 activations",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        help="with --mode w8a8: a folder of images (a few photos) to calibrate static activation scales on, "
        "instead of dynamic per-token scales",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    if not str(args.dst).endswith(".safetensors"):
        raise UsageError(f"OUT must end in .safetensors, got {args.dst!r}")
    if args.calibration is not None and args.mode != "w8a8":
        raise UsageError(f"--calibration sets static activation scales: it needs --mode w8a8, not {args.mode}")
    if os.path.isdir(args.dst):
        raise UsageError(f"OUT {args.dst} is a folder")
    if os.path.exists(args.dst):
        if os.path.exists(args.src) and os.path.samefile(args.src, args.dst):
            raise UsageError(f"OUT {args.dst} is IN: write the quantized weights to another file")
        if not args.overwrite:
            raise UsageError(f"OUT {args.dst} exists: pass --overwrite to replace it")
    try:
        from ..quantize import is_quantized, param_bytes, quantize
    except ImportError as e:
        raise UsageError(f"needs qwix ({e}): pip install 'sam-jax[quant]'") from None
    from ..checkpoints import save

    t0 = time.perf_counter()
    images = None if args.calibration is None else _calibration_images(args.calibration)
    model, params = load_weights(args.src)
    if is_quantized(model, params):
        raise UsageError(f"{args.src} is already quantized")
    qmodel, qparams = quantize(model, params, args.mode, calibration=images)
    save(args.dst, qparams, qmodel, source=str(args.src))
    ratio = param_bytes(qparams) / param_bytes(params)
    static = "" if images is None else f", static activation scales from {len(images)} images"
    print(
        f"quantized {args.src} ({args.mode}{static}): {param_bytes(qparams) / 1e6:.1f} MB of parameters, "
        f"{ratio:.3f}x the float bytes -> {args.dst} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def _calibration_images(folder: str) -> List[np.ndarray]:
    """The images of FOLDER, read as every subcommand reads one; UsageError (one line) for a path
    that is not a folder, a folder without files, or a file that is not an image."""
    if not os.path.isdir(folder):
        raise UsageError(f"--calibration: no such folder: {folder}")
    try:
        return [read_image(f) for f in list_inputs(folder)]
    except UsageError as e:
        raise UsageError(f"--calibration: {e}") from None


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax quantize") -> int:
    return run_command(argv, prog, build_parser, run)
