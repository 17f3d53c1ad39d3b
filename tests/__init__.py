"""The test suite. A package, so that tests and `bench/` import the reference helpers as
`tests.reference` from the repository root.

`segment_anything` imports torchvision, whose PyPI wheels do not load against the CPU torch: a
stand-in (reference/torchvision_standin/README.md) goes first on sys.path here, before any test
module or the reference package can import `segment_anything`. It costs no import (no torch).
"""

import os
import sys

STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "torchvision_standin")
if STANDIN not in sys.path:
    sys.path.insert(0, STANDIN)
