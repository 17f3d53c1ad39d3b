"""What every subcommand shares: the parser that raises, the one-line error handling, the image reader.

A usage error (a bad flag, an unreadable input, weights that do not load) prints one line,
`PROG: error: MESSAGE`, on stderr and exits with status 2; an OSError while writing (a folder that
is not writable) prints the same one line and exits with 1. Outputs are written with
`sam_jax._atomic` (whole or not at all).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..checkpoints.errors import first_line


class UsageError(Exception):
    """Bad command-line input; the message is printed as one line and the exit status is 2."""


class ImageError(UsageError):
    """An input image that is missing or cannot be decoded: a usage error for a command that reads
    one image, a skipped file for one that reads a folder."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage block: the CLI prints one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


def add_weights_argument(p: argparse.ArgumentParser, default: Optional[str] = None) -> None:
    """`--weights`, as every subcommand that runs the model takes it: a name or a path; required
    unless the subcommand gives a default."""
    p.add_argument(
        "--weights",
        required=default is None,
        default=default,
        help="vit_b, vit_l, vit_h or a Hugging Face SAM id such as facebook/sam-vit-base (downloaded and "
        "converted once, then cached: sam-jax weights list), or a path: converted .safetensors, official "
        ".pth, Hugging Face folder" + (f" (default {default})" if default else ""),
    )


def add_hq_token_only_argument(p: argparse.ArgumentParser) -> None:
    """`--hq-token-only`, for the subcommands that decode masks; check it with `check_hq_token_only`
    once the weights are loaded."""
    p.add_argument(
        "--hq-token-only",
        action="store_true",
        help="SAM-HQ weights only: the HQ mask alone instead of SAM's mask + the HQ mask",
    )


def load_weights(weights: str):
    """`(model, params)` of WEIGHTS as `sam_jax.load` reads it (a name or a path); a missing file or
    weights that do not load are a UsageError (one line, exit status 2)."""
    from ..checkpoints import load

    try:
        return load(weights)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def check_hq_token_only(args: argparse.Namespace, model) -> bool:
    """args.hq_token_only, or UsageError when it is given for weights that are not SAM-HQ's."""
    if args.hq_token_only and not model.config.hq:
        raise UsageError(f"--hq-token-only needs SAM-HQ weights; {args.weights} are not SAM-HQ's")
    return bool(args.hq_token_only)


def run_command(
    argv: Optional[Sequence[str]],
    prog: str,
    build_parser: Callable[[str], argparse.ArgumentParser],
    command: Callable[[argparse.Namespace, str], int],
) -> int:
    """Parses `argv` and returns `command(args, prog)`, turning UsageError (exit 2) and OSError
    (exit 1) into one line on stderr. `--help` prints and exits 0 through argparse."""
    try:
        args = build_parser(prog).parse_args(argv)
        return command(args, prog)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. the output folder is not writable
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1


def list_inputs(path: str) -> List[str]:
    """The files an IMAGE-or-FOLDER argument names: the file itself, or the folder's visible
    files, sorted; UsageError for a missing path or a folder without files."""
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


def read_image(path: str) -> np.ndarray:
    """The image as displayed: uint8 (H, W, 3) RGB with its EXIF orientation applied, so that
    pixel prompts and outputs match what a viewer shows. Pixels are converted as
    `sam_jax.inputs.pil_to_rgb_uint8` says (16-bit and float images scaled, palettes applied, CMYK
    converted; a float image outside [0, 1] is refused). Raises ImageError (one line) if the file
    is missing, is not an image Pillow can decode, or cannot be converted.

    Pillow's guard against decompression bombs is kept as Pillow draws it: an image of more than
    twice `PIL.Image.MAX_IMAGE_PIXELS` (~179 megapixels by default) is refused in one line; one
    between the limit and twice it is read, without Pillow's warning: such sizes are real photos
    (100-megapixel cameras exist).
    """
    from ..inputs import open_displayed

    try:
        return open_displayed(path)
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, ValueError, ...)
        raise ImageError(f"cannot read image {path}: {first_line(e)}") from None
