"""What every subcommand shares: the parser that raises, the one-line error handling, the image reader.

A usage error (a bad flag, an unreadable input, weights that do not load) prints one line,
`PROG: error: MESSAGE`, on stderr and exits with status 2; an OSError while writing (a folder that
is not writable) prints the same one line and exits with 1. Outputs are written with
`sam_jax._atomic` (whole or not at all).
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

import numpy as np


class UsageError(Exception):
    """Bad command-line input; the message is printed as one line and the exit status is 2."""


class ImageError(UsageError):
    """An input image that is missing or cannot be decoded: a usage error for a command that reads
    one image, a skipped file for one that reads a folder."""


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing the usage block: the CLI prints one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(message)


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


def read_image(path: str) -> np.ndarray:
    """The image as displayed: uint8 (H, W, 3) RGB with its EXIF orientation applied, so that
    pixel prompts and outputs match what a viewer shows. Raises ImageError (one line) if the file
    is missing or is not an image Pillow can decode."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    except FileNotFoundError:
        raise ImageError(f"no such image: {path}") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, ValueError, ...)
        raise ImageError(f"cannot read image {path}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    """A decoder's message, at most its first line (or the exception's type when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
