"""Low precision, both sides, one run: the official SAM in fp32, under bf16 autocast and with int8
dynamic quantization, against sam_jax in fp32, bf16, w8 and w8a8, on the same weights.

    python bench/precision.py [--model vit_b] [--image coffee] [--repeats 3] [--rows set_image predict amg]
                              [--variants ...] [--amg-variants ...] [--amg-repeats 1] [--no-memory]
                              [--json bench/precision_results.json]
    python bench/precision.py --model tiny --repeats 1 --json /tmp/p.json   # checks the script runs

First, a GEMM yardstick (2048^3, same process): XLA fp32, bf16 x bf16 -> bf16, bf16 x bf16 -> f32
(`preferred_element_type`), int8 x int8 -> int32; torch fp32 and bf16. It says what the machine's
matrix units give each precision, so that the rows below can be read: on a CPU without fast bf16 /
int8 (no AMX, no AVX512-BF16 / VNNI), low precision cannot pay and the rows show its cost.

Then, per variant (`VARIANTS`), `set_image` (resize + encoder: the resize is ~1% of it), `predict`
(1 point, multimask, full-size masks) and, for `--amg-variants` only, "amg" (`generate(image)`
with the default settings, image encoding included; `--amg-repeats` calls): the first call
(sam_jax: tracing + compilation) and the median of the repeats; "vs ref": the ratio to the faster
of official fp32 and official bf16 autocast in the same run (issue 27's reference), "vs fp32": to
official fp32. The variants' parameter bytes, and with
memory on, each variant's peak resident memory alone in a fresh process (load, set_image, predict).

Both sides get the same randomised checkpoint (tests/reference/, converted by the real converter,
as bench/predictor.py). Official variants: "official fp32" as shipped; "official bf16" the image
encoder under `torch.autocast(bfloat16)` (bench/official_fast.py); "official int8" the image
encoder's `nn.Linear` layers under `torch.ao.quantization.quantize_dynamic` (qint8). sam_jax:
`bench.common.sam_jax_variant`. Fidelity is the test suite's job (tests/fidelity.py), not this
script's. Not part of the test run: minutes on a 2-core CPU; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository root, for bench/ and tests.reference

from bench.common import SAM_JAX_VARIANTS, load_image, peak_rss_mb, sam_jax_variant, write_results  # noqa: E402
from bench.official_fast import OfficialConfig, configure_official  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.reference import official_sam, randomise_  # noqa: E402  (puts the torchvision stand-in on sys.path)

import sam_jax  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402

OFFICIAL_VARIANTS = ("official fp32", "official bf16", "official int8")
VARIANTS = OFFICIAL_VARIANTS + tuple(f"sam_jax {v}" for v in SAM_JAX_VARIANTS)
ROWS = ("set_image", "predict", "amg")
# The AMG row (default settings: 32 x 32 points) takes minutes a call on a CPU for the official
# generator (~3 min on vit_b, 2 cores): by default only these variants run it, `--amg-repeats` times.
AMG_VARIANTS = ("official fp32", "sam_jax fp32", "sam_jax bf16")


def _rate(fn: Callable[[], Any], flop: float, seconds: float = 1.0) -> float:
    """GFLOP/s of fn after a warm-up call; repeated for about `seconds` (once, for a slow path:
    a CPU without int8 / bf16 dot instructions can take many seconds a call)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > 5 * seconds:  # the warm-up call alone says enough: a slow path
        return flop / first / 1e9
    t0 = time.perf_counter()
    fn()
    one = time.perf_counter() - t0
    repeats = max(1, min(10, int(seconds / one)))
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return flop * repeats / (time.perf_counter() - t0) / 1e9


def gemm_yardstick(n: int = 2048) -> Dict[str, float]:
    """GFLOP/s (GOP/s for int8) of one n^3 matrix product in each precision, same process."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b = jax.random.normal(k1, (n, n)), jax.random.normal(k2, (n, n))
    ab, bb = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    ai, bi = jnp.clip(a * 40, -127, 127).astype(jnp.int8), jnp.clip(b * 40, -127, 127).astype(jnp.int8)
    dot = jax.jit(lambda x, y, t: jax.lax.dot(x, y, preferred_element_type=t), static_argnums=2)
    flop = 2.0 * n**3
    out = {
        "xla fp32": _rate(lambda: dot(a, b, jnp.float32).block_until_ready(), flop),
        "xla bf16 -> bf16": _rate(lambda: dot(ab, bb, jnp.bfloat16).block_until_ready(), flop),
        "xla bf16 -> f32": _rate(lambda: dot(ab, bb, jnp.float32).block_until_ready(), flop),
        "xla int8 -> int32": _rate(lambda: dot(ai, bi, jnp.int32).block_until_ready(), flop),
    }
    ta, tb = torch.randn(n, n), torch.randn(n, n)
    out["torch fp32"] = _rate(lambda: ta @ tb, flop)
    out["torch bf16"] = _rate(lambda: ta.bfloat16() @ tb.bfloat16(), flop)
    return out


def official_variant(tm: torch.nn.Module, name: str) -> torch.nn.Module:
    """The official model (a copy) as variant `name` runs it."""
    tm = copy.deepcopy(tm).eval()
    if name == "official bf16":
        return configure_official(tm, OfficialConfig(device="cpu", bf16=True))
    if name == "official int8":
        tm.image_encoder = torch.ao.quantization.quantize_dynamic(tm.image_encoder, {torch.nn.Linear}, torch.qint8)
    return tm


def predictor(name: str, workdir: str, tm: torch.nn.Module = None):
    """(predictor of variant `name`, its parameter bytes or None)."""
    if name in OFFICIAL_VARIANTS:
        from bench.predictor import reference_package

        model_type = json.load(open(os.path.join(workdir, "meta.json")))["model"]
        if tm is None:
            tm = official_sam(sam_jax.get_config(model_type))
            tm.load_state_dict(torch.load(os.path.join(workdir, "sam.pth")))
        return reference_package(model_type).SamPredictor(official_variant(tm, name)), None
    model, params = sam_jax_variant(*sam_jax.load(os.path.join(workdir, "sam.safetensors")), name.split()[-1])
    from sam_jax.quantize import param_bytes

    return sam_jax.SamPredictor(model, params, compile_ahead=False), param_bytes(params)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _calls(pred, image: np.ndarray, generator=None) -> Dict[str, Callable[[], Any]]:
    h, w = image.shape[:2]
    point = dict(point_coords=np.array([[w * 0.45, h * 0.55]]), point_labels=np.array([1]))
    calls = {"set_image": lambda: pred.set_image(image), "predict": lambda: pred.predict(**point)}
    if generator is not None:
        calls["amg"] = lambda: generator.generate(image)
    return calls


def generator(name: str, pred, model_type: str):
    """The automatic mask generator (default settings) of variant `name` over its predictor's model."""
    if name in OFFICIAL_VARIANTS:
        from bench.predictor import reference_package

        return reference_package(model_type).SamAutomaticMaskGenerator(pred.model)
    return sam_jax.SamAutomaticMaskGenerator(pred.model, pred.params)


def time_variant(pred, image: np.ndarray, rows, repeats: int, gen=None, amg_repeats: int = 1) -> Dict[str, Any]:
    """Per row: the first call (sam_jax: tracing + compilation; set_image's is the variant's very
    first call, which every later row needs) and the median of `repeats` more (`amg_repeats` for
    "amg", run only with a generator `gen`)."""
    calls = _calls(pred, image, gen)
    out = {}
    with torch.no_grad():
        first_set = _timed(calls["set_image"])
        for row in rows:
            if row not in calls:
                continue
            first = first_set if row == "set_image" else _timed(calls[row])
            times = [_timed(calls[row]) for _ in range(amg_repeats if row == "amg" else repeats)]
            out[row] = {"first_call_s": first, "median_s": statistics.median(times), "all_s": times}
    return out


def memory_child(name: str, workdir: str, image_name: str) -> None:
    pred, _ = predictor(name, workdir)
    with torch.no_grad():
        for call in _calls(pred, load_image(image_name)).values():  # set_image, then predict
            call()
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "mobile_sam", "tiny"])
    p.add_argument("--image", default="coffee", help="a skimage.data photo name (default coffee, 400x600)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--amg-variants", nargs="*", default=list(AMG_VARIANTS), choices=list(VARIANTS))
    p.add_argument("--amg-repeats", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "precision_results.json"))
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--memory-child", nargs=2, metavar=("VARIANT", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.amg_repeats < 1:
        p.error("--repeats and --amg-repeats must be >= 1")
    torch.set_num_threads(args.torch_threads)
    if args.memory_child:
        memory_child(*args.memory_child, args.image)
        return 0

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}")
    gemm = gemm_yardstick()
    print("GEMM 2048^3, GFLOP/s: " + ", ".join(f"{k} {v:.3g}" for k, v in gemm.items()), flush=True)

    variants = list(args.variants)
    if "official bf16" in variants and gemm["torch bf16"] < 0.05 * gemm["torch fp32"] and args.model != "tiny":
        # No bf16 matrix instructions: torch's bf16 GEMM falls to a scalar path (0.2 GFLOP/s on an
        # AVX2-only EPYC), and one vit_b encoder call under autocast would take most of an hour.
        variants.remove("official bf16")
        print("official bf16 left out: torch's bf16 GEMM is under 5% of its fp32 rate on this machine", flush=True)
    tmp = tempfile.TemporaryDirectory()
    tm = randomise_(official_sam(sam_jax.get_config(args.model)), seed=1)
    torch.save(tm.state_dict(), os.path.join(tmp.name, "sam.pth"))
    if convert_main([os.path.join(tmp.name, "sam.pth"), os.path.join(tmp.name, "sam.safetensors")]) != 0:
        raise SystemExit("conversion failed")
    with open(os.path.join(tmp.name, "meta.json"), "w") as f:
        json.dump({"model": args.model}, f)
    image = load_image(args.image)
    load_before = os.getloadavg()
    results: Dict[str, Dict[str, Any]] = {}
    for name in variants:
        pred, nbytes = predictor(name, tmp.name, tm)
        gen = generator(name, pred, args.model) if "amg" in args.rows and name in args.amg_variants else None
        results[name] = time_variant(pred, image, args.rows, args.repeats, gen, args.amg_repeats)
        results[name]["param_bytes"] = nbytes
        if not args.no_memory:
            cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", name, tmp.name, "--image", args.image]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name]["peak_rss_mb"] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        del pred, gen
        res = results[name]
        timings = [f"{r} {res[r]['median_s']:.4f} s (1st {res[r]['first_call_s']:.2f})" for r in args.rows if r in res]
        print(f"  {name}: " + ", ".join(timings), flush=True)
    tmp.cleanup()
    print_table(results, args.rows)
    meta = {
        "model": args.model,
        "image": args.image,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor(),
        "machine": platform.platform(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax_device": str(jax.devices()[0]),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "gemm_gflops": gemm,
        "variants": results,
    }
    write_results(args.json, meta)
    return 0


def print_table(results: Dict[str, Dict[str, Any]], rows: List[str]) -> None:
    def ref(row: str):
        times = [results[v][row]["median_s"] for v in ("official fp32", "official bf16") if row in results.get(v, {})]
        return min(times) if times else None

    head = f"{'variant':<16}" + "".join(f" {r + ' s':>13} {'vs ref':>7} {'vs fp32':>7}" for r in rows)
    head += f" {'param MB':>9} {'peak MB':>8}"
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        line = f"{name:<16}"
        for r in rows:
            if r not in res:
                line += f" {'-':>13} {'-':>7} {'-':>7}"
                continue
            t, base, fp32 = res[r]["median_s"], ref(r), results.get("official fp32", {}).get(r)
            line += f" {t:>13.4f} {t / base if base else float('nan'):>7.3f}"
            line += f" {t / fp32['median_s'] if fp32 else float('nan'):>7.3f}"
        mb = res.get("param_bytes")
        line += f" {mb / 1e6 if mb else float('nan'):>9.1f} {res.get('peak_rss_mb', float('nan')):>8.0f}"
        print(line)


if __name__ == "__main__":
    sys.exit(main())
