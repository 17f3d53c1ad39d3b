"""sam_jax `SamAutomaticMaskGenerator` vs the official one, same weights, same photo, one run.

    python bench/amg.py [--model vit_b] [--image coffee] [--repeats 1] [--json bench/amg_results.json]
    python bench/amg.py --model tiny --json /tmp/amg_smoke.json     # checks the script runs (seconds)
    python bench/amg.py --model vit_h --device cuda --official-mode fast   # on a GPU (the defaults there)

Both sides get the same randomised full-size checkpoint (tests/reference/, converted by the real
converter, as bench/predictor.py). Rows:
  * "generate": `generate(image)` with the DEFAULT settings (32 x 32 points, thresholds 0.88 /
    0.95, ...), image encoding included;
  * "from embedding": the same without the image encoding: sam_jax `generate_from_embedding`;
    for the official generator the predictor's `set_image` is replaced by restoring features
    computed beforehand (its `_process_crop` calls set_image / reset_image).
Every (side, row) runs in its OWN subprocess, so its peak resident memory (VmHWM of that
process: model weights, framework runtime, XLA compilation and the generation itself) is
measured alone; the embedding for the "from embedding" rows is computed by the parent and read
from a .npy file. sam_jax's first call (tracing + compilation) is timed separately from the
steady-state calls. The load average is recorded around each child: this machine may be shared.

The official side runs on `--device` (default: cuda when torch sees one) in `--official-mode`
("eager": fp32 as shipped, the CPU default; "fast": SDPA + bf16 autocast + torch.compile in the
image encoder, the CUDA default; see bench/official_fast.py). On a GPU, read the sam_jax
"generate" row of `--model vit_h` as the time per image of a 32 x 32 grid.

Not part of the test run: it takes many minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository root, for bench/ and tests.reference

from bench.common import load_image, peak_rss_mb, write_results  # noqa: E402

SIDES = ("official", "sam_jax")
ROWS = ("generate", "from embedding")


def child(
    side: str, row: str, workdir: str, image_name: str, repeats: int, device: str = "cpu", official_mode: str = "eager"
) -> Dict[str, Any]:
    """One (side, row) measurement in this process; returns times and the process's peak RSS."""
    import numpy as np

    image = load_image(image_name)
    times: List[float] = []
    first = None
    if side == "official":
        import torch
        from tests.reference import official_sam  # noqa: F401  (puts the torchvision stand-in on sys.path)
        from segment_anything import SamAutomaticMaskGenerator

        import sam_jax
        from bench.official_fast import OfficialConfig, configure_official

        torch.set_num_threads(os.cpu_count() or 1)
        tm = official_sam(sam_jax.get_config(json.load(open(os.path.join(workdir, "meta.json")))["model"]))
        tm.load_state_dict(torch.load(os.path.join(workdir, "sam.pth"), map_location="cpu", weights_only=True))
        gen = SamAutomaticMaskGenerator(configure_official(tm, OfficialConfig.from_mode(official_mode, device)))
        if row == "from embedding":
            p = gen.predictor
            features = torch.from_numpy(np.load(os.path.join(workdir, "official_features.npy"))).to(device)
            h, w = image.shape[:2]
            input_size = tuple(p.transform.get_preprocess_shape(h, w, p.transform.target_length))

            def restore(_image, image_format="RGB"):
                p.reset_image()
                p.features, p.original_size, p.input_size, p.is_image_set = features, (h, w), input_size, True

            p.set_image = restore
        run = lambda: gen.generate(image)  # noqa: E731  (returns host arrays: synchronised)
        with torch.no_grad():
            if official_mode == "fast" and row == "generate":  # torch.compile compiles on the first call
                t0 = time.perf_counter()
                run()
                first = time.perf_counter() - t0
            for _ in range(repeats):
                t0 = time.perf_counter()
                n = len(run())
                times.append(time.perf_counter() - t0)
    else:
        import jax

        import sam_jax

        model, params = sam_jax.load(os.path.join(workdir, "sam.safetensors"))
        gen = sam_jax.SamAutomaticMaskGenerator(model, params)
        if row == "from embedding":
            emb = jax.device_put(np.load(os.path.join(workdir, "sam_jax_embedding.npy")))
            run = lambda: gen.generate_from_embedding(emb, image.shape[:2])  # noqa: E731
        else:
            run = lambda: gen.generate(image)  # noqa: E731
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        for _ in range(repeats):
            t0 = time.perf_counter()
            n = len(run())
            times.append(time.perf_counter() - t0)
    return {
        "side": side,
        "row": row,
        "masks": n,
        "times_s": times,
        "median_s": statistics.median(times),
        "first_call_s": first,
        "peak_rss_mb": peak_rss_mb(),
    }


def prepare(model_type: str, image_name: str, workdir: str) -> None:
    """Weights for both sides and the embeddings for the "from embedding" rows."""
    import numpy as np
    import torch
    from tests.reference import official_sam, randomise_
    from segment_anything import SamPredictor as OfficialPredictor

    import sam_jax
    from convert.__main__ import main as convert_main

    tm = randomise_(official_sam(sam_jax.get_config(model_type)), seed=1)
    torch.save(tm.state_dict(), os.path.join(workdir, "sam.pth"))
    if convert_main([os.path.join(workdir, "sam.pth"), os.path.join(workdir, "sam.safetensors")]) != 0:
        raise SystemExit("conversion failed")
    image = load_image(image_name)
    off = OfficialPredictor(tm)
    with torch.no_grad():
        off.set_image(image)
    np.save(os.path.join(workdir, "official_features.npy"), off.features.numpy())
    model, params = sam_jax.load(os.path.join(workdir, "sam.safetensors"))
    ours = sam_jax.SamPredictor(model, params, compile_ahead=False)
    ours.set_image(image)
    np.save(os.path.join(workdir, "sam_jax_embedding.npy"), np.asarray(ours.image_embeddings[0]))
    with open(os.path.join(workdir, "meta.json"), "w") as f:
        json.dump({"model": model_type}, f)


def run_child(side: str, row: str, workdir: str, args) -> Dict[str, Any]:
    load_before = os.getloadavg()
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        side,
        row,
        workdir,
        "--image",
        args.image,
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
        "--official-mode",
        args.official_mode,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{side} / {row} failed:\n{out.stderr[-4000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load_before"], result["load_after"] = load_before, os.getloadavg()
    return result


def print_table(results: List[Dict[str, Any]]) -> None:
    by = {(r["side"], r["row"]): r for r in results}
    head = (
        f"{'row':<16} {'official s':>10} {'sam_jax s':>10} {'ratio':>6} {'sam_jax 1st s':>13} "
        f"{'official MB':>11} {'sam_jax MB':>10} {'masks':>11}"
    )
    print(head)
    print("-" * len(head))
    for row in ROWS:
        o, j = by.get(("official", row)), by.get(("sam_jax", row))
        if not (o and j):
            continue
        print(
            f"{row:<16} {o['median_s']:>10.1f} {j['median_s']:>10.1f} {j['median_s'] / o['median_s']:>6.3f} "
            f"{j['first_call_s']:>13.1f} {o['peak_rss_mb']:>11.0f} {j['peak_rss_mb']:>10.0f} "
            f"{o['masks']:>5d}/{j['masks']:<5d}"
        )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        default="vit_b",
        choices=["vit_b", "vit_l", "vit_h", "tiny"],
        help="tiny: a smoke test of the script (seconds), not a benchmark",
    )
    p.add_argument("--image", default="coffee", help="a skimage.data photo name (default coffee, 400x600)")
    p.add_argument("--repeats", type=int, default=1, help="timed calls per (side, row) after sam_jax's first")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--json", default=os.path.join(ROOT, "bench", "amg_results.json"))
    p.add_argument("--device", help="torch device of the official model (default: cuda when available)")
    p.add_argument(
        "--official-mode",
        choices=("eager", "fast"),
        help="eager: fp32 as shipped; fast: SDPA + bf16 autocast + torch.compile in the image "
        "encoder (bench/official_fast.py). Default: fast on cuda, else eager",
    )
    p.add_argument("--child", nargs=3, metavar=("SIDE", "ROW", "WORKDIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device is None or args.official_mode is None:
        from bench.official_fast import default_device, default_mode

        args.device = args.device or default_device()
        args.official_mode = args.official_mode or default_mode(args.device)
    if args.child:
        side, row, workdir = args.child
        print(json.dumps(child(side, row, workdir, args.image, args.repeats, args.device, args.official_mode)))
        return 0

    results = []
    with tempfile.TemporaryDirectory() as d:
        prepare(args.model, args.image, d)
        for row in args.rows:
            for side in SIDES:
                r = run_child(side, row, d, args)
                results.append(r)
                print(
                    f"  {side:>8} / {row}: {r['median_s']:.1f} s, peak {r['peak_rss_mb']:.0f} MB, "
                    f"{r['masks']} masks, load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}",
                    flush=True,
                )
    print_table(results)
    import jax
    import torch

    meta = {
        "model": args.model,
        "image": args.image,
        "image_shape": list(load_image(args.image).shape),
        "repeats": args.repeats,
        "device": args.device,
        "official_mode": args.official_mode,
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "results": results,
    }
    write_results(args.json, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
