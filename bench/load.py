"""Loading weights by name against loading the same file by path (`sam_jax.load`).

A cached name (`sam_jax.load("vit_b")`) must cost what loading the converted `.safetensors` by its
path costs: the name is resolved to the cached file without a lock, a network call or an import of
the downloaders. Random vit_b params are saved as the cached `vit_b` of a temporary `$SAM_JAX_HOME`;
both ways are timed alternately in one process (the file stays in the page cache for both).

    python bench/load.py [--model vit_b] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    p.add_argument("--repeats", type=int, default=7)
    args = p.parse_args(argv)

    import jax

    import sam_jax
    from sam_jax.checkpoints import named

    with tempfile.TemporaryDirectory() as home:
        os.environ[named.HOME_ENV] = home
        model = sam_jax.build_sam(args.model)
        params = jax.device_get(sam_jax.init_params(model, jax.random.PRNGKey(0)))
        path = named.cached_path(args.model)
        sam_jax.save(path, params, model.config)
        del params
        times = {"by path": [], "by name": []}
        for _ in range(args.repeats):
            for how, arg in (("by path", path), ("by name", args.model)):
                t0 = time.perf_counter()
                _, loaded = sam_jax.load(arg)
                jax.block_until_ready(loaded)
                times[how].append(time.perf_counter() - t0)
                del loaded
        size = os.path.getsize(path) / 1e6
    print(f"{args.model}: {size:.0f} MB, {args.repeats} loads each, alternating, one process")
    for how, ts in times.items():
        print(f"  {how:>8}: median {statistics.median(ts):.3f} s (min {min(ts):.3f}, max {max(ts):.3f})")
    ratio = statistics.median(times["by name"]) / statistics.median(times["by path"])
    print(f"  by name / by path: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
