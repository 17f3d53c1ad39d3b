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


# sam_jax's precision modes, as a user switches them on a loaded model.
SAM_JAX_VARIANTS = ("fp32", "bf16", "w8", "w8a8")


def sam_jax_variant(model, params, variant: str):
    """(model, params) of a loaded float sam_jax model in precision `variant` (SAM_JAX_VARIANTS):
    "bf16" computes in bf16 on the fp32 params (`model.clone(dtype=bfloat16)`), "w8" / "w8a8" are
    `sam_jax.quantize`'s modes (needs qwix)."""
    if variant == "fp32":
        return model, params
    if variant == "bf16":
        import jax.numpy as jnp

        return model.clone(dtype=jnp.bfloat16), params
    if variant in ("w8", "w8a8"):
        from sam_jax.quantize import quantize

        return quantize(model, params, variant)
    raise ValueError(f"variant must be one of {SAM_JAX_VARIANTS}, got {variant!r}")
