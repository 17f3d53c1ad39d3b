"""python -m convert SRC DST.safetensors [--model-type auto|vit_b|vit_l|vit_h|sam_hq_vit_b|...]
python -m convert --to hf SRC OUT_DIR
python -m convert --to pytorch PARAMS.safetensors OUT.pth

The same command as `sam-jax convert` (`sam_jax.cli.convert`), under this name.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from sam_jax.cli import convert


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m convert") -> int:
    return convert.main(argv, prog)


if __name__ == "__main__":
    sys.exit(main())
