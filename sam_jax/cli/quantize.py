"""`sam-jax quantize`: int8 post-training quantization of SAM weights into a sam_jax file.

    sam-jax quantize IN OUT.safetensors [--mode w8|w8a8] [--overwrite]

IN: weights as every subcommand takes them (vit_b, a Hugging Face id, a converted .safetensors
file, an official .pth, a Hugging Face folder). OUT: a sam_jax .safetensors file holding int8
kernels and float32 scales, its metadata recording the mode; `sam_jax.load(OUT)` returns the
quantized model (no torch needed) and every subcommand takes OUT as `--weights`. An existing OUT
is kept unless --overwrite. Needs qwix (the `quant` extra). `--calibration DIR` is accepted in
the issue's spelling but static activation scales are not implemented: it is a usage error.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Optional, Sequence

from .common import Parser, UsageError, load_weights, run_command

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
    p.add_argument("--calibration", metavar="DIR", help="calibration images for static activation scales")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    if not str(args.dst).endswith(".safetensors"):
        raise UsageError(f"OUT must end in .safetensors, got {args.dst!r}")
    if args.calibration is not None:
        raise UsageError("--calibration: static activation scales are not implemented; quantize without it")
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
    model, params = load_weights(args.src)
    if is_quantized(model, params):
        raise UsageError(f"{args.src} is already quantized")
    qmodel, qparams = quantize(model, params, args.mode)
    save(args.dst, qparams, qmodel, source=str(args.src))
    ratio = param_bytes(qparams) / param_bytes(params)
    print(
        f"quantized {args.src} ({args.mode}): {param_bytes(qparams) / 1e6:.1f} MB of parameters, "
        f"{ratio:.3f}x the float bytes -> {args.dst} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax quantize") -> int:
    return run_command(argv, prog, build_parser, run)
