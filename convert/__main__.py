"""python -m convert SRC DST.safetensors [--model-type auto|vit_b|vit_l|vit_h]
python -m convert --to hf SRC OUT_DIR
python -m convert --to pytorch PARAMS.safetensors OUT.pth

SRC: an official checkpoint (.pth), a Hugging Face folder (config.json + model.safetensors) or
model.safetensors file, or (with --to hf / --to pytorch) a sam_jax .safetensors file, e.g.
fine-tuned params. The key names tell the layout. `--to pytorch` writes an official-format state
dict that `segment_anything.sam_model_registry[...](checkpoint=OUT.pth)` loads strictly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

MODEL_TYPES = ("auto", "vit_b", "vit_l", "vit_h", "default")
TARGETS = ("sam_jax", "hf", "pytorch")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block: the CLI prints one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Convert an official SAM checkpoint (.pth) or Hugging Face "
                                       "SAM weights into a sam_jax .safetensors file, or sam_jax "
                                       "weights into a Hugging Face folder (--to hf) or an official "
                                       "PyTorch .pth (--to pytorch).")
    p.add_argument("src", help="sam_vit_b_01ec64.pth, a Hugging Face folder or model.safetensors, "
                               "or (--to hf / pytorch) a sam_jax .safetensors file")
    p.add_argument("dst", help="output: sam_vit_b.safetensors, a folder with --to hf, "
                               "or OUT.pth with --to pytorch")
    p.add_argument("--model-type", default="auto", choices=MODEL_TYPES,
                   help="model size; 'auto' (default) detects it from the tensor shapes")
    p.add_argument("--to", default="sam_jax", choices=TARGETS,
                   help="output format: sam_jax (default), hf (config.json + model.safetensors) "
                        "or pytorch (official state dict .pth)")
    return p


def load_source(src: str, model_type: str = "auto") -> Tuple[Any, Dict[str, Any]]:
    """Any supported SRC -> (SamConfig, nested params). Raises ConversionError."""
    from sam_jax.config import get_config

    from .errors import ConversionError
    from .hf import convert_hf_state_dict, is_hf_layout, load_hf, read_safetensors
    from .official import convert_state_dict, read_pth

    if os.path.isdir(src):
        return load_hf(src, model_type)
    if not os.path.isfile(src):
        raise ConversionError(f"{src}: no such file or folder")
    if not src.endswith(".safetensors"):
        state = read_pth(src)
    else:
        state, meta = read_safetensors(src)
        if meta.get("format") == "sam_jax":
            from sam_jax.io import load

            try:
                model, params = load(src)
            except ValueError as e:
                raise ConversionError(str(e)) from None
            if model_type != "auto" and get_config(model_type) != model.config:
                raise ConversionError(f"{src}: holds a model other than --model-type {model_type}")
            return model.config, params
    convert = convert_hf_state_dict if is_hf_layout(state) else convert_state_dict
    return convert(state, model_type)


def run(args: argparse.Namespace) -> int:
    from sam_jax.io import save

    from .errors import ConversionError
    from .hf import export_hf
    from .official import describe

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
        if to_hf:
            export_hf(params, cfg, args.dst)
        elif to_pt:
            from .pytorch_export import export_pth

            export_pth(params, args.dst, cfg)
        else:
            save(args.dst, params, cfg)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {args.dst}: {e.strerror or e}", file=sys.stderr)
        return 1
    import numpy as np
    from sam_jax.io import flatten_params

    flat = flatten_params(params)
    n = sum(int(np.size(v)) for v in flat.values())
    out = f"{args.dst} (config.json, model.safetensors)" if to_hf else args.dst
    print(f"{'exported' if to_hf or to_pt else 'converted'} {describe(cfg)}: {len(flat)} tensors, "
          f"{n / 1e6:.1f} M values -> {out} ({time.perf_counter() - t0:.1f} s)")
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m convert") -> int:
    try:
        args = build_parser(prog).parse_args(argv)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
