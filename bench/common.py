"""What the benchmark scripts share: the test photo, peak-memory reading and writing the results."""

from __future__ import annotations

import json
import resource
from typing import Any, Dict


def peak_rss_mb() -> float:
    """Peak resident memory of THIS process image in MB: VmHWM, which starts afresh at exec.
    (ru_maxrss does not: on Linux it keeps the high-water mark of the forked parent's copy.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kilobytes on Linux


def write_results(path: str, meta: Dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {path}")


def load_image(name: str):
    """A photo bundled with scikit-image (no download), as (H, W, 3) uint8 RGB."""
    import numpy as np
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])
