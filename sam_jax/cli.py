"""`sam-jax` command line: `sam-jax convert ...`, `sam-jax segment ...` (more subcommands join here)."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

USAGE = "usage: sam-jax {convert,segment,amg} ...  (sam-jax COMMAND --help for details)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(f"sam-jax: error: no command given; {USAGE}", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "convert":
        from convert.__main__ import main as convert_main

        return convert_main(rest, prog="sam-jax convert")
    if cmd == "segment":
        from .segment_cli import main as segment_main

        return segment_main(rest, prog="sam-jax segment")
    if cmd == "amg":
        from .amg_cli import main as amg_main

        return amg_main(rest, prog="sam-jax amg")
    print(f"sam-jax: error: unknown command {cmd!r}; {USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
