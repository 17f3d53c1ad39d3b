"""The test suite. A package, so that tests and `bench/` import the reference helpers as
`tests.reference` from the repository root.

`segment_anything` imports torchvision, whose PyPI wheels do not load against the CPU torch, and
MobileSAM's `mobile_sam` four names from timm, which imports torchvision: stand-ins
(reference/torchvision_standin/README.md, reference/timm_standin/README.md) go first on sys.path
here, before any test module, bench/ or the reference package can import either. They cost no
import (no torch).
"""

import os
import sys

_REFERENCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference")
STANDIN = os.path.join(_REFERENCE, "torchvision_standin")
TIMM_STANDIN = os.path.join(_REFERENCE, "timm_standin")
for _path in (TIMM_STANDIN, STANDIN):
    if _path not in sys.path:
        sys.path.insert(0, _path)
