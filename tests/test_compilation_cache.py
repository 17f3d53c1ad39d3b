"""The persistent compilation cache: a second process reuses the first one's executables."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys, jax, numpy as np, sam_jax
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
from sam_jax.compilation_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1], min_compile_time_secs=0.0)
model = sam_jax.build_sam("tiny")
params = sam_jax.init_params(model, jax.random.PRNGKey(0))
x = np.zeros((1, 160, 160, 3), np.float32)
jax.jit(lambda p, x: model.apply({"params": p}, x, method=model.encode_image))(params, x).block_until_ready()
print(len(hits))
"""


def _run(cache_dir) -> int:
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True, text=True, cwd=ROOT, timeout=600
    )
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.full  # two fresh JAX processes, one compiling cold (~30 CPU-s)
def test_second_process_hits_the_cache(tmp_path):
    assert _run(tmp_path) == 0  # cold: everything compiled and written
    assert any(tmp_path.iterdir())
    assert _run(tmp_path) >= 2  # warm: init and the encoder come from the cache


def test_rejects_negative_threshold(tmp_path):
    from sam_jax.compilation_cache import enable_compilation_cache

    with pytest.raises(ValueError, match="min_compile_time_secs"):
        enable_compilation_cache(tmp_path, -1)
