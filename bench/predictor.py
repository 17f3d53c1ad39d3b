"""sam_jax `SamPredictor` vs the official PyTorch `SamPredictor`, on the same weights, in one run
(for `--model mobile_sam`, MobileSAM's own `mobile_sam.SamPredictor`; for `--model sam_hq_vit_b`,
SAM-HQ's `segment_anything_hq.SamPredictor`).

    python bench/predictor.py [--model vit_b] [--repeats 5] [--min-time 10] [--image coffee]
                              [--torch-threads N] [--rows ROW ...] [--json FILE] [--no-memory]
                              [--device cuda] [--official-mode fast] [--batch 8]

Both sides get the same randomised full-size checkpoint: the official model is built and every
tensor randomised by tests/reference/, saved as .pth, converted by the real converter
(`python -m convert`), and loaded with `sam_jax.load`. Each row is timed interleaved (official,
then sam_jax, `--repeats` times, and fast rows until `--min-time` seconds have passed) after one
warm-up call per side; the table shows the number of repeats, medians, their ratio, and the
"paired" ratio (median over repeats of sam_jax / the official call just before). The first
sam_jax call of a row (tracing + XLA compilation, for the shapes of that row) is reported
separately. Rows are a registry: add one with `@row("name")` below:
set_image (resize + encoder), encoder (encoder alone on the same preprocessed input), encoder bf16
(sam_jax computing in bf16, params fp32, against the official fp32), predict 1 point (multimask,
full-size masks), predict 64 boxes; and, by default only on a CUDA device, "encoder batch":
`--batch` images through the encoder, sam_jax in bf16 with `jax.nn.dot_product_attention` on a
GPU, with its rate in TFLOP/s and as a share of the bf16 matmul rate measured in the same run.
Peak memory: each side alone in a fresh process loads the weights, sets the image and predicts
once; its VmHWM (host memory) is reported.

The official side runs on `--device` (default: cuda when torch sees one) in `--official-mode`:
"eager" (fp32, as shipped; the CPU default) or "fast" (the CUDA default: the image encoder with
`F.scaled_dot_product_attention`, bf16 autocast and `torch.compile`, bench/official_fast.py), so
that on a GPU sam_jax is compared with the strongest PyTorch configuration, not eager fp32.

Not part of the test run: it takes several minutes on a 2-core CPU. Run it on an otherwise idle
machine: the JSON records the load average before and after, and a busy machine slows torch's
OpenMP threads far more than XLA's (see --torch-threads).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository root, for bench/ and tests.reference

from bench.common import load_image, peak_rss_mb, write_results  # noqa: E402
from bench.official_fast import (  # noqa: E402
    MODES,
    OfficialConfig,
    configure_official,
    default_device,
    default_mode,  # noqa: E402
    synchronize,
    torch_matmul_tflops,
)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.reference import official_sam, randomise_  # noqa: E402  (puts the torchvision stand-in on sys.path)

import sam_jax  # noqa: E402
from convert.__main__ import main as convert_main  # noqa: E402


@dataclasses.dataclass
class Context:
    """What rows share: both predictors, with `image` already set on each."""

    image: np.ndarray
    official: Any  # segment_anything.SamPredictor
    ours: sam_jax.SamPredictor
    rng: np.random.Generator
    official_config: OfficialConfig = OfficialConfig()
    batch: int = 8

    def sync(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """fn, returning only when the official model's queued device work has finished."""

        def run():
            out = fn()
            synchronize(self.official_config.device)
            return out

        return run


@dataclasses.dataclass
class Row:
    name: str
    official: Callable[[], Any]
    ours: Callable[[], Any]


ROWS: Dict[str, Callable[[Context], Row]] = {}
GPU_ROWS = ("encoder batch",)  # run by default only on a CUDA device (minutes per call on a CPU)


def row(name: str):
    """Registers a row factory: ctx -> Row(official=..., ours=...). Each callable does one timed
    operation and returns only when its result is computed (sam_jax: blocked until ready)."""

    def register(make: Callable[[Context], Row]) -> Callable[[Context], Row]:
        ROWS[name] = make
        return make

    return register


@row("set_image")
def _set_image(ctx: Context) -> Row:
    # Both return once the embedding is computed (sam_jax's set_image blocks; torch is synced).
    return Row("set_image", ctx.sync(lambda: ctx.official.set_image(ctx.image)), lambda: ctx.ours.set_image(ctx.image))


def _encoder_row(ctx: Context, name: str, dtype: Any, batch: int = 1, attention_impl: str = "chunked") -> Row:
    """The image encoder alone on the preprocessed 1024x1024 input (no resize, no transfer), as
    the predictor runs it (`backend.encode_staged` where `backend.staging_pays()`, else one jit);
    `batch` copies of it."""
    from sam_jax import backend

    resized = ctx.official.transform.apply_image(ctx.image)
    with torch.no_grad():
        one = torch.as_tensor(resized, device=ctx.official.device).permute(2, 0, 1)[None].contiguous()
        x_t = ctx.official.model.preprocess(one).repeat(batch, 1, 1, 1)
    x = jax.device_put(x_t.cpu().numpy().transpose(0, 2, 3, 1))  # the same (B, S, S, 3) input, NHWC
    model = sam_jax.build_sam(ctx.ours.model.config, dtype=dtype, attention_impl=attention_impl)

    def official():
        with torch.no_grad():
            return ctx.official.model.image_encoder(x_t)

    one_jit = backend.jit_tuned if backend.encoder_runs_tuned(model.config) else jax.jit
    encode = (
        (lambda p, x: backend.encode_staged(model, p, x))
        if backend.staging_pays(model.config)
        else one_jit(lambda p, x: model.apply({"params": p}, x, method=sam_jax.Sam.encode_image))
    )
    return Row(name, ctx.sync(official), lambda: jax.block_until_ready(encode(ctx.ours.params, x)))


@row("encoder")
def _encoder(ctx: Context) -> Row:
    return _encoder_row(ctx, "encoder", None)


@row("encoder bf16")
def _encoder_bf16(ctx: Context) -> Row:
    # sam_jax computing in bf16 (params fp32) against the official fp32 encoder.
    import jax.numpy as jnp

    return _encoder_row(ctx, "encoder bf16", jnp.bfloat16)


@row("encoder batch")
def _encoder_batch(ctx: Context) -> Row:
    # The GPU acceptance row: on an accelerator sam_jax computes in bf16 with
    # jax.nn.dot_product_attention (cuDNN); on a CPU in fp32 with the default attention.
    import jax.numpy as jnp

    gpu = jax.default_backend() != "cpu"
    return _encoder_row(
        ctx, "encoder batch", jnp.bfloat16 if gpu else None, ctx.batch, "dot_product_attention" if gpu else "chunked"
    )


@row("predict 1 point")
def _predict_point(ctx: Context) -> Row:
    h, w = ctx.image.shape[:2]
    pts, labels = np.array([[w * 0.45, h * 0.55]]), np.array([1])
    # Multimask, full-size boolean masks: the official default call.
    return Row("predict 1 point", lambda: ctx.official.predict(pts, labels), lambda: ctx.ours.predict(pts, labels))


@row("predict 64 boxes")
def _predict_boxes(ctx: Context) -> Row:
    h, w = ctx.image.shape[:2]
    xy = ctx.rng.uniform(0, 1, (64, 2, 2)) * [w, h]
    boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1)
    boxes_t = torch.as_tensor(ctx.official.transform.apply_boxes(boxes, (h, w)), dtype=torch.float)
    # Official: its batched predict_torch (boxes already in the model frame); ours: predict_batch.
    boxes_t = boxes_t.to(ctx.official.device)
    return Row(
        "predict 64 boxes",
        ctx.sync(lambda: ctx.official.predict_torch(None, None, boxes_t)),
        lambda: ctx.ours.predict_batch(boxes=boxes),
    )


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def reference_package(model_type: str):
    """The reference code of a model: the official `segment_anything`, or MobileSAM's `mobile_sam`
    (its own predictor and registry, where the model is "vit_t")."""
    import importlib

    cfg = sam_jax.get_config(model_type)
    if cfg.hq:
        return importlib.import_module("segment_anything_hq")
    return importlib.import_module("mobile_sam" if cfg.encoder_type == "tiny_vit" else "segment_anything")


# The reference registries' names, where they differ.
REGISTRY_NAMES = {"mobile_sam": "vit_t", "sam_hq_vit_b": "vit_b", "sam_hq_vit_l": "vit_l", "sam_hq_vit_h": "vit_h"}


def build(model_type: str, workdir: str, official_config: OfficialConfig = OfficialConfig()):
    """Randomised official model + the same weights through the real converter; the official
    model then moved and sped up as official_config says."""
    tm = randomise_(official_sam(sam_jax.get_config(model_type)), seed=1)
    pth, out = os.path.join(workdir, "sam.pth"), os.path.join(workdir, "sam.safetensors")
    torch.save(tm.state_dict(), pth)
    if convert_main([pth, out]) != 0:
        raise SystemExit("conversion failed")
    model, params = sam_jax.load(out)
    official = reference_package(model_type).SamPredictor
    return official(configure_official(tm, official_config)), sam_jax.SamPredictor(model, params, compile_ahead=False)


def encoder_flops(cfg: sam_jax.SamConfig, batch: int = 1) -> float:
    """Multiply-adds x 2 of the image encoder (patch embedding, blocks on the window-padded grid,
    attention scores and weighted sums, neck); elementwise work and rel-pos terms left out."""
    g, d, p = cfg.image_size // cfg.patch_size, cfg.encoder_embed_dim, cfg.patch_size
    hidden = int(d * cfg.mlp_ratio)
    total = 2 * g * g * 3 * p * p * d
    for i in range(cfg.encoder_depth):
        if i in cfg.encoder_global_attn_indexes:
            n, per_window = g * g, g * g
        else:
            side = -(-g // cfg.window_size) * cfg.window_size
            n, per_window = side * side, cfg.window_size**2
        total += 2 * n * d * (4 * d + 2 * hidden) + 4 * n * per_window * d
    c = cfg.prompt_embed_dim
    total += 2 * g * g * (d * c + 9 * c * c)
    return float(total * batch)


def jax_matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Measured bf16 matmul rate of XLA on jax's default device, TFLOP/s (n x n x n, after warm-up)."""
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    mm = jax.jit(jnp.matmul)
    for _ in range(3):
        mm(a, b).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = mm(a, b)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def run_row(r: Row, repeats: int, settle: float, min_time: float = 0.0) -> Dict[str, Any]:
    first_ours = _timed(r.ours)  # trace + compile + run
    first_official = _timed(r.official)
    official, ours = [], []
    start = time.perf_counter()
    # At least `repeats` pairs, and fast rows until `min_time` has passed: a median over a few
    # 0.1 s calls on a shared VM moves by +-10% from run to run.
    while len(official) < repeats or time.perf_counter() - start < min_time:
        # --settle > 0: each timed call starts after a pause (the first click after idle).
        time.sleep(settle)
        official.append(_timed(r.official))
        time.sleep(settle)
        ours.append(_timed(r.ours))
    med_o, med_j = statistics.median(official), statistics.median(ours)
    # "paired": the median over repeats of (sam_jax / the official call just before it), which a
    # drift in the machine's speed during the run (shared VMs) moves less than the medians' ratio.
    paired = statistics.median(j / o for o, j in zip(official, ours))
    return {
        "name": r.name,
        "repeats": len(official),
        "official_s": med_o,
        "sam_jax_s": med_j,
        "ratio": med_j / med_o,
        "paired_ratio": paired,
        "sam_jax_first_call_s": first_ours,
        "official_first_call_s": first_official,
        "official_all_s": official,
        "sam_jax_all_s": ours,
    }


def memory_child(side: str, workdir: str, model_type: str, image_name: str) -> None:
    """One side alone in a fresh process: load the weights, set_image, predict one point; prints
    the process's peak resident memory (weights + runtime + compilation + activations) as JSON."""
    image = load_image(image_name)
    h, w = image.shape[:2]
    pts, labels = np.array([[w * 0.45, h * 0.55]]), np.array([1])
    if side == "official":
        ref = reference_package(model_type)
        registry_name = REGISTRY_NAMES.get(model_type, model_type)
        pred = ref.SamPredictor(ref.sam_model_registry[registry_name](checkpoint=os.path.join(workdir, "sam.pth")))
    else:
        pred = sam_jax.SamPredictor(*sam_jax.load(os.path.join(workdir, "sam.safetensors")), compile_ahead=False)
    pred.set_image(image)
    pred.predict(pts, labels)
    print(json.dumps({"side": side, "peak_rss_mb": peak_rss_mb()}))


def measure_memory(workdir: str, args) -> Dict[str, float]:
    import subprocess

    out = {}
    for side in ("official", "sam_jax"):
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-child",
            side,
            "--workdir",
            workdir,
            "--model",
            args.model,
            "--image",
            args.image,
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[side] = json.loads(res.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    return out


def print_table(results: List[Dict[str, Any]]) -> None:
    head = (
        f"{'row':<20} {'n':>4} {'official s':>11} {'sam_jax s':>10} {'ratio':>7} {'paired':>7} "
        f"{'sam_jax 1st call s':>19}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r['name']:<20} {r['repeats']:>4} {r['official_s']:>11.4f} {r['sam_jax_s']:>10.4f} {r['ratio']:>7.3f} "
            f"{r['paired_ratio']:>7.3f} {r['sam_jax_first_call_s']:>19.2f}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="vit_b", choices=["vit_b", "vit_l", "vit_h", "mobile_sam", "sam_hq_vit_b", "sam_hq_vit_l"]
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image", default="coffee", help="a skimage.data photo name (default coffee, 400x600)")
    p.add_argument(
        "--rows",
        nargs="*",
        help=f"subset of {list(ROWS)} (default: all, but {list(GPU_ROWS)} only when --device is cuda)",
    )
    p.add_argument(
        "--device",
        default=default_device(),
        help="torch device of the official model (default: cuda when available); sam_jax uses jax's default device",
    )
    p.add_argument(
        "--official-mode",
        choices=MODES,
        help="eager: fp32 as shipped; fast: SDPA + bf16 autocast + torch.compile in the "
        "image encoder (bench/official_fast.py). Default: fast on cuda, else eager",
    )
    p.add_argument("--batch", type=int, default=8, help="images per call in the 'encoder batch' row")
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "predictor_results.json"))
    p.add_argument(
        "--torch-threads",
        type=int,
        default=os.cpu_count() or 1,
        help="torch intra-op threads (default: all cores). On a busy machine torch's OpenMP "
        "barriers stall when a thread is descheduled: 1 thread is then the fairer baseline",
    )
    p.add_argument(
        "--min-time",
        type=float,
        default=10.0,
        help="seconds each row keeps repeating for, past --repeats (default 10: fast rows "
        "such as predict 1 point get ~70 repeats, slow rows exactly --repeats)",
    )
    p.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds of idle before each timed call (default 0: back to back). A pause "
        "measures the first click after idle instead: on the 2-core VM both sides then "
        "slow down (predict 1 point: official 86 -> 89 ms, sam_jax 43 -> 56 ms)",
    )
    p.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the peak-memory measurement (always skipped with --device cuda: it measures host memory)",
    )
    p.add_argument("--memory-child", choices=["official", "sam_jax"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.min_time < 0 or args.batch < 1:
        p.error("--repeats and --batch must be >= 1 and --min-time >= 0")
    cuda = torch.device(args.device).type == "cuda"
    if args.rows is None:
        args.rows = [r for r in ROWS if cuda or r not in GPU_ROWS]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    official_config = OfficialConfig.from_mode(args.official_mode or default_mode(args.device), args.device)

    torch.set_num_threads(args.torch_threads)
    if args.memory_child:
        memory_child(args.memory_child, args.workdir, args.model, args.image)
        return 0
    image = load_image(args.image)
    tmp = tempfile.TemporaryDirectory()
    official, ours = build(args.model, tmp.name, official_config)
    print(f"official: {official_config.describe()}; sam_jax: {jax.devices()[0]}", flush=True)
    ctx = Context(image, official, ours, np.random.default_rng(0), official_config, args.batch)
    official.set_image(image)
    ours.set_image(image)
    load_before = os.getloadavg()
    if load_before[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"warning: load average {load_before[0]:.1f} on {os.cpu_count()} cores: other processes "
            "compete for the CPU; torch's OpenMP threads suffer more from that than XLA's",
            flush=True,
        )
    results = []
    for name in args.rows:
        r = run_row(ROWS[name](ctx), args.repeats, args.settle, args.min_time)
        results.append(r)
        print(f"  {name}: official {r['official_s']:.4f} s, sam_jax {r['sam_jax_s']:.4f} s", flush=True)
    print_table(results)
    rates = None
    if "encoder batch" in args.rows:
        # The encoder's rate against what a plain bf16 matmul reaches on the same devices.
        flops = encoder_flops(ours.model.config, args.batch)
        r = next(r for r in results if r["name"] == "encoder batch")
        rates = {
            "encoder_gflop": flops / 1e9,
            "batch": args.batch,
            "official_tflops": flops / r["official_s"] / 1e12,
            "sam_jax_tflops": flops / r["sam_jax_s"] / 1e12,
        }
        line = (
            f"encoder batch {args.batch}: {flops / 1e12:.2f} TFLOP per call; official "
            f"{rates['official_tflops']:.2f}, sam_jax {rates['sam_jax_tflops']:.2f} TFLOP/s"
        )
        if jax.default_backend() != "cpu" and cuda:  # a CPU's bf16 matmul is emulated: no yardstick
            rates["jax_matmul_bf16_tflops"] = jax_matmul_tflops()
            rates["torch_matmul_bf16_tflops"] = torch_matmul_tflops(args.device)
            rates["sam_jax_share_of_matmul"] = rates["sam_jax_tflops"] / rates["jax_matmul_bf16_tflops"]
            line += (
                f" = {100 * rates['sam_jax_share_of_matmul']:.0f}% of XLA's bf16 matmul rate "
                f"({rates['jax_matmul_bf16_tflops']:.0f}; torch's {rates['torch_matmul_bf16_tflops']:.0f})"
            )
        print(line)
    memory = None
    if not args.no_memory and not cuda:  # host memory of CPU runs; on a GPU it would say little
        # Each side alone in a fresh process: peak RSS of load + set_image + one predict.
        memory = measure_memory(tmp.name, args)
        print(
            f"peak memory (load + set_image + predict, own process): official {memory['official']:.0f} MB, "
            f"sam_jax {memory['sam_jax']:.0f} MB"
        )
    tmp.cleanup()
    meta = {
        "model": args.model,
        "image": args.image,
        "image_shape": list(image.shape),
        "repeats": args.repeats,
        "min_time_s": args.min_time,
        "settle_s": args.settle,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "jax_device": str(jax.devices()[0]),
        "machine": platform.platform(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "official": official_config.describe(),
        "batch": args.batch,
        "encoder_rates": rates,
        "rows": results,
        "peak_rss_mb": memory,
    }
    write_results(args.json, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
