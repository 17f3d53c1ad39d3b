"""JAX's persistent compilation cache, so a second process start skips the compiles.

A ViT encoder and the decoder buckets take tens of seconds to compile on a CPU; with the cache on,
XLA's executables are stored in a folder and reused by the next process with the same jax version,
backend, model and shapes. Equivalent to setting JAX_COMPILATION_CACHE_DIR before starting Python.
"""

from __future__ import annotations

import os
from typing import Optional

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "sam_jax", "xla")


def enable_compilation_cache(path: Optional[str | os.PathLike] = None, min_compile_time_secs: float = 0.5) -> str:
    """Stores compiled executables under `path` (default ~/.cache/sam_jax/xla) from now on.

    Only compilations slower than `min_compile_time_secs` are stored (jax's own default is 1 s).
    Returns the folder used. Call it once, before the first jitted call you want cached.
    """
    if min_compile_time_secs < 0:
        raise ValueError(f"min_compile_time_secs must be >= 0, got {min_compile_time_secs}")
    folder = os.path.abspath(os.fspath(path if path is not None else DEFAULT_DIR))
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    return folder
