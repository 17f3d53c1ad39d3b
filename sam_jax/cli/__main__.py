"""`python -m sam_jax.cli`: the `sam-jax` command without the installed script."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
