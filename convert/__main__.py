"""python -m convert SRC.pth DST.safetensors [--model-type auto|vit_b|vit_l|vit_h]"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

MODEL_TYPES = ("auto", "vit_b", "vit_l", "vit_h", "default")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block: the CLI prints one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def build_parser(prog: str = "python -m convert") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Convert an official SAM checkpoint (.pth) into a sam_jax "
                                       ".safetensors file.")
    p.add_argument("src", help="official checkpoint, e.g. sam_vit_b_01ec64.pth")
    p.add_argument("dst", help="output file, e.g. sam_vit_b.safetensors")
    p.add_argument("--model-type", default="auto", choices=MODEL_TYPES,
                   help="model size; 'auto' (default) detects it from the tensor shapes")
    return p


def run(args: argparse.Namespace) -> int:
    from sam_jax.io import save

    from .errors import ConversionError
    from .official import describe, load_official

    if not str(args.dst).endswith(".safetensors"):
        print(f"error: DST must end in .safetensors, got {args.dst!r}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        cfg, params = load_official(args.src, args.model_type)
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
    print(f"converted {describe(cfg)}: {len(flat)} tensors, {n / 1e6:.1f} M values -> {args.dst} "
          f"({time.perf_counter() - t0:.1f} s)")
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
