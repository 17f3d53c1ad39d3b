"""`sam-jax demo`: a click-to-segment page for a model, served on this machine.

    sam-jax demo [--weights NAME_OR_PATH] [--port 8000] [--host 127.0.0.1] [--cache 3]
                 [--dtype float32|bfloat16]

Prints one line with the address once it listens, then serves until Ctrl+C (exit status 0). It
listens on 127.0.0.1 only unless --host says otherwise; any other host (0.0.0.0: every interface)
is said in that line. The page: open or drop an image (its embedding is computed once), left
click for a positive point, right click or Shift+click for a negative one, drag for a box;
"Segment everything" runs the automatic mask generator; downloads: the mask as PNG, all masks
as COCO RLE JSON (the records `sam-jax amg` writes). See `sam_jax.demo`.

Usage errors (a bad flag, a port outside 0..65535, a host that names no address, weights that do
not load): one line on stderr, exit status 2. A port already in use, or an address that is not
this machine's: one line, exit status 1, as any OSError of the command line. Both are found
before the weights load. Needs the `demo` extra: pip install 'sam-jax[demo]'.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from .common import Parser, UsageError, add_weights_argument, load_weights, run_command


def build_parser(prog: str = "sam-jax demo") -> argparse.ArgumentParser:
    p = Parser(prog=prog, description="Serve a click-to-segment page for a model.")
    # An interactive page: the official base model unless told otherwise (fetched once by name).
    add_weights_argument(p, default="vit_b")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface, so other "
        "machines can use the page)",
    )
    p.add_argument(
        "--cache", type=int, default=3, metavar="N", help="images whose embeddings are kept (default 3; oldest dropped)"
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of the model (default float32; bfloat16: the parameters stay as loaded)",
    )
    return p


def run(args: argparse.Namespace, prog: str) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: expected a port number from 0 to 65535")
    if args.cache < 1:
        raise UsageError(f"--cache {args.cache}: keep at least one image")
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"the demo needs its extra: pip install 'sam-jax[demo]' ({e})") from None
    from ..demo import create_app, serving

    try:
        sock = serving.bind(args.host, args.port)
    except ValueError as e:
        raise UsageError(str(e)) from None
    with sock:
        model, params = load_weights(args.weights)
        if args.dtype != "float32":
            import jax.numpy as jnp

            model = model.clone(dtype=jnp.dtype(args.dtype))
        app = create_app(model, params, cache_size=args.cache, name=args.weights)
        server = serving.server(app)
        sock.listen()
        print(serving.address_line(prog, args.weights, sock.getsockname()), flush=True)
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn stops on Ctrl+C, then raises it again for the caller
            pass
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "sam-jax demo") -> int:
    return run_command(argv, prog, build_parser, run)
