"""`sam-jax` command line: `sam-jax segment ...`, `sam-jax amg ...`, `sam-jax convert ...`,
`sam-jax weights ...`, `sam-jax demo ...`, `sam-jax quantize ...`.

One module per subcommand, each with `build_parser(prog)` and `main(argv, prog) -> exit status`;
`common` holds what they share (parser, one-line errors, image reader).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from . import amg, convert, demo, quantize, segment, weights

COMMANDS = {
    "convert": convert.main,
    "segment": segment.main,
    "amg": amg.main,
    "weights": weights.main,
    "demo": demo.main,
    "quantize": quantize.main,
}
USAGE = "usage: sam-jax {convert,segment,amg,weights,demo,quantize} ...  (sam-jax COMMAND --help for details)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"sam-jax: error: no command given; {USAGE}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"sam-jax: error: unknown command {cmd!r}; {USAGE}", file=sys.stderr)
        return 2
    return COMMANDS[cmd](rest, prog=f"sam-jax {cmd}")
