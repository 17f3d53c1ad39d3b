"""`sam-jax weights`: the weights cache behind `--weights vit_b` and `sam_jax.load("vit_b")`.

    sam-jax weights list            every known name, whether it is cached, where and how big
    sam-jax weights path NAME       the cached file of NAME (exit 1 when it is not cached)
    sam-jax weights fetch NAME      download, check and convert NAME now (--force: again)
    sam-jax weights clear [NAME]    remove the cached weights of NAME, or of every name

NAME: vit_b, vit_l, vit_h, or a Hugging Face SAM repository id such as facebook/sam-vit-base. The
cache folder is $SAM_JAX_HOME, else the platform's user cache folder.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ..checkpoints import named
from ..checkpoints.sources import fetch
from .common import Parser, UsageError, run_command


def build_parser(prog: str = "sam-jax weights") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="The weights cache: list, path NAME, fetch NAME, clear [NAME].")
    sub = p.add_subparsers(dest="action", required=True, parser_class=Parser, metavar="{list,path,fetch,clear}")
    sub.add_parser("list", help="known names, what is cached, where and how big")
    sub.add_parser("path", help="the cached converted file of NAME").add_argument("name")
    f = sub.add_parser("fetch", help="download, check and convert NAME into the cache")
    f.add_argument("name")
    f.add_argument("--force", action="store_true", help="fetch again even when NAME is cached")
    sub.add_parser("clear", help="remove cached weights (one NAME, or all)").add_argument("name", nargs="?")
    return p


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _name(name: str) -> str:
    if not named.is_name(name):
        raise UsageError(f"unknown weights name {name!r}; {named.describe_known()}")
    return name


def run(args: argparse.Namespace, prog: str) -> int:
    try:
        if args.action == "list":
            print(f"cache: {named.home()}")
            have = {name: (path, size) for name, path, size in named.cached()}
            entries = named.registry()
            for name in sorted(set(entries) | set(have)):
                where = f"{_size(have[name][1]):>9}  {have[name][0]}" if name in have else "not cached"
                source = entries[name].url if name in entries else "Hugging Face"
                print(f"{name:<28} {where}  ({source})")
            return 0
        if args.action == "path":
            path = named.cached_path(_name(args.name))
            if not os.path.isfile(path):
                hint = f"fetch it with: sam-jax weights fetch {args.name}"
                print(f"{prog}: error: {args.name} is not cached; {hint}", file=sys.stderr)
                return 1
            print(path)
            return 0
        if args.action == "fetch":
            path = fetch(_name(args.name), force=args.force)
            print(f"{args.name}: {path} ({_size(os.path.getsize(path))})")
            return 0
        removed = named.clear(None if args.name is None else _name(args.name))
        for path, size in removed:
            print(f"removed {path} ({_size(size)})")
        print(f"freed {_size(sum(size for _, size in removed))}")
        return 0
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax weights") -> int:
    return run_command(argv, prog, build_parser, run)
