"""`sam-jax convert` (also `python -m convert`): checkpoints between sam_jax, official and HF.

    sam-jax convert SRC DST.safetensors [--model-type auto|vit_b|vit_l|vit_h|sam_hq_vit_b|...]
    sam-jax convert --to hf SRC OUT_DIR
    sam-jax convert --to pytorch PARAMS.safetensors OUT.pth

SRC: an official checkpoint (.pth; SAM, SAM-HQ or MobileSAM), a Hugging Face folder (config.json +
model.safetensors; transformers' SamModel or SamHQModel) or model.safetensors file, or (with --to hf
/ --to pytorch) a sam_jax .safetensors file, e.g. fine-tuned params. The key names tell the layout.
`--to pytorch` writes an official-format state dict that
`segment_anything.sam_model_registry[...](checkpoint=OUT.pth)` (SAM-HQ: `segment_anything_hq`'s)
loads strictly; `--to hf` a folder that transformers' `SamModel.from_pretrained` (SAM-HQ:
`SamHQModel`) loads strictly.
Usage errors: one line on stderr, exit status 2; a checkpoint that cannot be converted or written:
`error: ...` (every problem found, briefly), exit status 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

from ..checkpoints import ConversionError, export_hf, export_pth, flatten_params, load_source, save
from ..checkpoints.named import DownloadError
from ..checkpoints.official import describe
from .common import Parser, run_command

MODEL_TYPES = (
    "auto",
    "vit_b",
    "vit_l",
    "vit_h",
    "default",
    "mobile_sam",
    "vit_t",
    "sam_hq_vit_b",
    "sam_hq_vit_l",
    "sam_hq_vit_h",
)
TARGETS = ("sam_jax", "hf", "pytorch")


def build_parser(prog: str = "sam-jax convert") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        description="Convert an official SAM checkpoint (.pth; SAM-HQ's and MobileSAM's too) or Hugging Face "
        "SAM / SAM-HQ weights into a sam_jax .safetensors file, or sam_jax "
        "weights into a Hugging Face folder (--to hf) or an official "
        "PyTorch .pth (--to pytorch).",
    )
    p.add_argument(
        "src",
        help="sam_vit_b_01ec64.pth, a Hugging Face folder or model.safetensors, "
        "or (--to hf / pytorch) a sam_jax .safetensors file",
    )
    p.add_argument("dst", help="output: sam_vit_b.safetensors, a folder with --to hf, or OUT.pth with --to pytorch")
    p.add_argument(
        "--model-type",
        default="auto",
        choices=MODEL_TYPES,
        help="model size; 'auto' (default) detects it (SAM, SAM-HQ or MobileSAM) from the tensor names and shapes",
    )
    p.add_argument(
        "--to",
        default="sam_jax",
        choices=TARGETS,
        help="output format: sam_jax (default), hf (config.json + model.safetensors) "
        "or pytorch (official state dict .pth)",
    )
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    """Converts; returns the exit status. Its messages start "error:" without `prog`, as they
    always have (scripts may match them)."""
    to_hf, to_pt = args.to == "hf", args.to == "pytorch"
    if to_pt and not str(args.dst).endswith(".pth"):
        print(f"error: with --to pytorch, DST must end in .pth, got {args.dst!r}", file=sys.stderr)
        return 2
    if args.to == "sam_jax" and not str(args.dst).endswith(".safetensors"):
        print(f"error: DST must end in .safetensors, got {args.dst!r}", file=sys.stderr)
        return 2
    if to_hf and (str(args.dst).endswith(".safetensors") or os.path.isfile(args.dst)):
        print(f"error: with --to hf, DST is a folder, got {args.dst!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        cfg, params = load_source(args.src, args.model_type)
    except (ConversionError, DownloadError) as e:  # DownloadError: SRC named weights (vit_b, a Hub id)
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot read {args.src}: {e.strerror or e}", file=sys.stderr)
        return 1
    try:
        if to_hf:
            export_hf(params, cfg, args.dst)
        elif to_pt:
            export_pth(params, args.dst, cfg)
        else:
            save(args.dst, params, cfg)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a folder that does not exist or is not writable, a folder at DST
        print(f"error: cannot write {args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    flat = flatten_params(params)
    n = sum(int(np.size(v)) for v in flat.values())
    out = f"{args.dst} (config.json, model.safetensors)" if to_hf else args.dst
    print(
        f"{'exported' if to_hf or to_pt else 'converted'} {describe(cfg)}: {len(flat)} tensors, "
        f"{n / 1e6:.1f} M values -> {out} ({time.perf_counter() - t0:.1f} s)"
    )
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax convert") -> int:
    return run_command(argv, prog, build_parser, run)
