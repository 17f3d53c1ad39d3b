"""Where the image encoder's time goes, per kind of operation, in each sam_jax precision mode.

    python bench/profile_ops.py [--model vit_b] [--variants fp32 bf16 w8 w8a8] [--calls 2]
                                [--json bench/profile_ops_results.json]
    python bench/profile_ops.py --model tiny --json /tmp/ops.json     # checks the script runs

It answers the question `bench/precision.py`'s rows raise: why a low-precision mode is or is not
faster on this machine. First the same GEMM yardstick (what the machine's matrix units give each
precision), then, per variant, the jitted encoder (`sam_jax.encode_images`, one 1024 x 1024 image)
is traced with `jax.profiler` for `--calls` calls. XLA:CPU records one event per executed thunk (a
fusion, a library matmul, a copy); each thunk's time is put in one category by what its compiled HLO
computation holds:

  * "matmul int8 / bf16 / f32": it holds a dot or a convolution (by the operands' element type; the
    elementwise work fused into it counts with it);
  * "int8 quantize / rescale": no dot, but a rounding or a conversion to or from int8 / int32 (an
    activation's scales, rounding and casts before an int8 dot; the int32 result's rescale after);
  * "layout": only copies, transposes, slices, pads, concatenations, broadcasts;
  * "other": everything else (LayerNorm, softmax, GELU, residual adds, position terms).

Thunks run concurrently on the CPU's threads, so the categories' sum can exceed the wall time: the
shares say where the work is, the wall time what a caller waits. Not part of the test run.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time
from typing import Dict, Iterable, List, Mapping, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository root, for bench/

from bench.common import SAM_JAX_VARIANTS, sam_jax_variant, write_results  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sam_jax  # noqa: E402

CATEGORIES = ("matmul int8", "matmul bf16", "matmul f32", "int8 quantize / rescale", "layout", "other")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = ([a-z0-9]+)\[[^\]]*\]\S* ([a-z\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_LAYOUT_OPS = {
    "parameter",
    "constant",
    "bitcast",
    "copy",
    "transpose",
    "slice",
    "dynamic-slice",
    "dynamic-update-slice",
    "pad",
    "concatenate",
    "broadcast",
    "reshape",
    "tuple",
    "get-tuple-element",
    "iota",
}


def parse_hlo(text: str) -> Tuple[Dict[str, List[Tuple[str, str, str]]], Dict[str, Tuple[str, str, str]]]:
    """(computations: name -> [(op, result type, rest of line)], instructions: name -> (op, result
    type, rest of line)) of an HLO module's text (`compiled.as_text()`)."""
    comps: Dict[str, List[Tuple[str, str, str]]] = {}
    instrs: Dict[str, Tuple[str, str, str]] = {}
    current = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            continue
        m = _INSTR.match(line)
        if m and current is not None:
            name, dtype, op, rest = m.groups()
            current.append((op, dtype, rest))
            instrs[name] = (op, dtype, rest)
    return comps, instrs


def _ops(comps, entry: Tuple[str, str, str], seen=None) -> Iterable[Tuple[str, str, str]]:
    """The instruction itself and every instruction of the computations it calls, recursively."""
    seen = set() if seen is None else seen
    yield entry
    for callee in _CALLS.findall(entry[2]):
        if callee in comps and callee not in seen:
            seen.add(callee)
            for sub in comps[callee]:
                yield from _ops(comps, sub, seen)


def _operand_types(rest: str, instrs) -> List[str]:
    """Element types of an instruction's operands: printed inline (`f32[2,3] %x`) or, inside fused
    computations, looked up by name."""
    args = rest.split(")", 1)[0]
    inline = re.findall(r"\b(s8|s32|bf16|f32|f16|u8)\[", args)
    return inline or [instrs[n][1] for n in re.findall(r"%?([\w.\-]+)", args) if n in instrs]


def categorize(comps, instrs, thunk: str) -> str:
    """The category (`CATEGORIES`) of the thunk named `thunk`; "other" for a name not in the HLO."""
    if thunk not in instrs:
        return "other"
    ops = list(_ops(comps, instrs[thunk]))
    comps_types = {}
    for op, dtype, rest in ops:
        comps_types.setdefault(op, []).append((dtype, rest))
    for op in ("dot", "convolution"):
        for dtype, rest in comps_types.get(op, []):
            operands = _operand_types(rest, instrs)
            if "s8" in operands or dtype == "s32":
                return "matmul int8"
            if "bf16" in operands:
                return "matmul bf16"
        if op in comps_types:
            return "matmul f32"
    if "round-nearest-even" in comps_types or "round-nearest-afz" in comps_types:
        return "int8 quantize / rescale"
    for dtype, rest in comps_types.get("convert", []):
        if dtype in ("s8", "s32") or {"s8", "s32"} & set(_operand_types(rest, instrs)):
            return "int8 quantize / rescale"
    if {o for o, _, _ in ops} <= _LAYOUT_OPS:
        return "layout"
    return "other"


def thunk_times(trace_dir: str) -> Dict[str, float]:
    """Total microseconds per event name of the perfetto trace `jax.profiler.trace` wrote."""
    path = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    out: Dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            out[e["name"]] += float(e.get("dur", 0.0))
    return out


def profile(fn, args, calls: int) -> Dict[str, object]:
    """Per-category milliseconds per call of the jitted `fn(*args)` (compiled and run once before),
    the top thunks, and the median wall time of `calls` untraced calls."""
    jax.block_until_ready(fn(*args))
    comps, instrs = parse_hlo(fn.lower(*args).compile().as_text())
    walls = []
    for _ in range(calls):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        times = thunk_times(tmp)
    per_cat: Dict[str, float] = {c: 0.0 for c in CATEGORIES}
    per_thunk = []
    for name, us in times.items():
        if name in instrs:
            cat = categorize(comps, instrs, name)
            per_cat[cat] += us / calls / 1e3
            per_thunk.append((us / calls / 1e3, name, cat))
    per_thunk.sort(reverse=True)
    return {
        "ms_per_call": per_cat,
        "thunk_ms_total": sum(per_cat.values()),
        "wall_s_median": sorted(walls)[len(walls) // 2],
        "top_thunks": [{"ms": ms, "name": n, "category": c} for ms, n, c in per_thunk[:8]],
    }


def encoder(model, params):
    """The jitted encoder of (model, params) and its arguments: one zero image at full size (the
    work does not depend on the pixels)."""
    size = model.config.image_size
    images = jnp.zeros((1, size, size, 3), jnp.float32)
    sizes = jnp.array([[size, size]], jnp.int32)
    fn = jax.jit(lambda p, x, s: sam_jax.encode_images(model, p, x, s))
    return fn, (params, images, sizes)


def print_table(results: Mapping[str, Mapping[str, object]]) -> None:
    names = list(results)
    print(f"{'ms per encoder call':<26}" + "".join(f"{n:>10}" for n in names))
    for cat in CATEGORIES:
        print(f"{cat:<26}" + "".join(f"{results[n]['ms_per_call'][cat]:>10.1f}" for n in names))
    print(f"{'all thunks':<26}" + "".join(f"{results[n]['thunk_ms_total']:>10.1f}" for n in names))
    print(f"{'wall (median)':<26}" + "".join(f"{results[n]['wall_s_median'] * 1e3:>10.1f}" for n in names))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "mobile_sam", "tiny"])
    p.add_argument("--variants", nargs="*", default=list(SAM_JAX_VARIANTS), choices=list(SAM_JAX_VARIANTS))
    p.add_argument("--calls", type=int, default=2, help="traced calls per variant (and untimed ones)")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "profile_ops_results.json"))
    args = p.parse_args(argv)
    if args.calls < 1:
        p.error("--calls must be >= 1")
    from bench.precision import gemm_yardstick

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
    gemm = gemm_yardstick()
    print("GEMM 2048^3, GFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in gemm.items()), flush=True)
    model = sam_jax.build_sam(args.model)
    params = sam_jax.init_params(model, jax.random.PRNGKey(0))  # the work does not depend on the values
    results = {}
    for name in args.variants:
        vm, vp = sam_jax_variant(model, params, name)
        results[name] = profile(*encoder(vm, vp), calls=args.calls)
        print(f"  {name}: wall {results[name]['wall_s_median']:.3f} s", flush=True)
        del vm, vp
        jax.clear_caches()
    print_table(results)
    for name, res in results.items():
        top = ", ".join(f"{t['name']} {t['ms']:.0f} ms ({t['category']})" for t in res["top_thunks"][:4])
        print(f"{name} top thunks: {top}")
    meta = {
        "model": args.model,
        "calls": args.calls,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "machine": platform.platform(),
        "jax": jax.__version__,
        "gemm_gflops": gemm,
        "variants": results,
    }
    write_results(args.json, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
