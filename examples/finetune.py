"""Fine-tune SAM (sam_jax) on a folder of images + masks, a COCO json, or a synthetic dataset.

  # From scratch on a CPU: a 103 k-parameter 64-pixel model on the built-in synthetic data,
  # one-round episodes from a single point (the held-out metric) drawn 2 px inside the mask,
  # images drawn by mask count; ~10 min on 2 cores. Checkpoints every 2500 steps, not 250: each
  # orbax save holds the loop ~0.8 s even when written in the background, 40 steps of this model.
  python examples/finetune.py --synthetic 4000 --model nano64 --encoder full --corrective-points 0 \
      --no-point-rounds 0 --box-prob 0 --point-margin 2 --sample-by mask --objects 3 --batch-size 4 \
      --lr 2e-3 --warmup 100 --steps 27500 --eval-every 2500 --checkpoint-every 2500 --out out/scratch

  # Research path: cache embeddings once, train the prompt encoder + decoder for many epochs.
  python examples/finetune.py --weights sam_vit_b.safetensors --images imgs/ --masks masks/ \
      --steps 5000 --out out/run
  python examples/finetune.py --weights sam_vit_b.safetensors --coco ann.json --images imgs/ ...
  # LoRA on the encoder's attention projections (qwix), bf16 compute, and --remat: encoder blocks
  # and interactive rounds recomputed in the backward pass (less memory, same gradient):
  python examples/finetune.py ... --encoder lora --lora-rank 8 --bf16 --remat
  # SAM-HQ weights, the HQ-SAM recipe: only the HQ token and its layers train (BCE + dice on the
  # HQ mask; the held-out IoU is the HQ mask's):
  python examples/finetune.py --weights sam_hq_vit_b.safetensors --decoder hq --images imgs/ --masks masks/ ...
  # On a Linux CPU, jemalloc that keeps freed memory spares the page faults of XLA's per-step
  # buffers (vit_b research path: 1.49x faster; see the README's Fine-tune section):
  LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1 python examples/finetune.py ...

Writes to --out: params.safetensors (LoRA merged; export with `python -m convert --to pytorch`),
history.json, checkpoints/ (orbax; --resume continues bit-exactly), curves.png and overlays.png
(need matplotlib). Held-out IoU is from one positive point at the mask centre, the mask picked by
predicted IoU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sam_jax  # noqa: E402
from sam_jax import train  # noqa: E402
from sam_jax.train import data as tdata  # noqa: E402
from sam_jax.train.checkpoint import Checkpointer  # noqa: E402
from sam_jax.train.evaluate import single_point_iou  # noqa: E402
from sam_jax.train.synthetic import synthetic_dataset  # noqa: E402
from sam_jax.transforms import preprocess_padded  # noqa: E402

# Small models for training from scratch on a CPU (image_size a multiple of patch_size; windows of
# 8 tile the 16 x 16 embedding grid of a 256-pixel input exactly).
SCRATCH_CONFIGS = {
    "small128": sam_jax.SamConfig(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        image_size=128,
        patch_size=8,
        window_size=8,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
    "micro128": sam_jax.SamConfig(
        encoder_embed_dim=64,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        image_size=128,
        patch_size=8,
        window_size=8,
        prompt_embed_dim=64,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=256,
        decoder_num_heads=4,
        iou_head_hidden_dim=64,
    ),
    # The fastest to learn per second on a 2-core CPU: held-out IoU after 10-12 min rose as the
    # model shrank (micro128 0.64, nano64 0.73 at seed 0 on 48 held-out images), because every
    # config learned about the same per step and small steps are cheap. 64 px, patch 4: a 16 x 16
    # token grid. One encoder block, not two: the encoder was 43% of a batch-4 step, and the 28%
    # cheaper step buys more steps than the block was worth (seed 0: 0.750 in 16000 steps, 476 s;
    # two blocks 0.744 in 12000 steps, 428 s). A 128-wide IoU head costs nothing measurable and
    # picks better (0.744 vs 0.733 with 32).
    "nano64": sam_jax.SamConfig(
        encoder_embed_dim=32,
        encoder_depth=1,
        encoder_num_heads=2,
        encoder_global_attn_indexes=(0,),
        image_size=64,
        patch_size=4,
        window_size=8,
        prompt_embed_dim=32,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=128,
        decoder_num_heads=2,
        iou_head_hidden_dim=128,
    ),
    "small": sam_jax.SamConfig(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        image_size=256,
        patch_size=16,
        window_size=8,
        prompt_embed_dim=128,
        mask_in_chans=16,
        decoder_depth=2,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
}


def _number(kind, lo=None, above=None, hi=None, below=None):
    """argparse type: a `kind` number with lo <= x (or above < x) and x <= hi (or x < below); anything
    else is a usage error that names the flag and the range."""

    def parse(text: str):
        v = kind(text)  # ValueError -> argparse's "invalid int/float value"
        ok = (
            math.isfinite(v)
            and (lo is None or v >= lo)
            and (above is None or v > above)
            and (hi is None or v <= hi)
            and (below is None or v < below)
        )
        if not ok:
            want = [f"{op} {b}" for op, b in ((">=", lo), (">", above), ("<=", hi), ("<", below)) if b is not None]
            raise argparse.ArgumentTypeError(f"must be {' and '.join(want)}, got {text}")
        return v

    parse.__name__ = kind.__name__
    return parse


_COUNT, _POSITIVE = _number(int, lo=0), _number(int, lo=1)


class _Parser(argparse.ArgumentParser):
    """Usage errors print one line (no usage block) and exit 2, like the sam_jax CLIs."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n")[0])
    src = p.add_argument_group("data")
    src.add_argument("--synthetic", type=_COUNT, default=0, help="N synthetic training images")
    src.add_argument("--images", help="image folder (with --masks or --coco)")
    src.add_argument("--masks", help="mask folder: STEM.png (binary or labels) or STEM/*.png")
    src.add_argument("--coco", help="COCO instances json (images in --images)")
    src.add_argument(
        "--val-fraction", type=_number(float, lo=0.0, below=1.0), default=0.1, help="held-out share of folder data"
    )
    src.add_argument("--heldout", type=_POSITIVE, default=200, help="held-out synthetic images")
    m = p.add_argument_group("model")
    m.add_argument("--weights", help="start from these weights (.safetensors or official .pth)")
    m.add_argument("--model", default="small", help="from scratch: small, tiny, vit_b, ...")
    m.add_argument("--encoder", default="frozen", choices=train.step.ENCODER_MODES)
    m.add_argument(
        "--decoder",
        default="full",
        choices=train.step.DECODER_MODES,
        help="full: prompt encoder + mask decoder (SAM); hq: SAM-HQ weights, only the HQ parts (HQ-SAM)",
    )
    m.add_argument("--lora-rank", type=_POSITIVE, default=4)
    m.add_argument("--lora-alpha", type=_number(float, above=0.0), default=4.0)
    m.add_argument("--bf16", action="store_true", help="bfloat16 compute (params stay float32)")
    m.add_argument(
        "--remat",
        action="store_true",
        help="recompute encoder blocks and interactive rounds in the backward pass (less memory)",
    )
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=_POSITIVE, default=1000)
    o.add_argument("--batch-size", type=_POSITIVE, default=8, help="images per step")
    o.add_argument("--objects", type=_POSITIVE, default=4, help="ground-truth masks per image per step")
    o.add_argument("--lr", type=_number(float, above=0.0), default=1e-4)
    o.add_argument("--warmup", type=_COUNT, default=100)
    o.add_argument("--weight-decay", type=_number(float, lo=0.0), default=0.1)
    o.add_argument("--corrective-points", type=_COUNT, default=8)
    o.add_argument("--no-point-rounds", type=_COUNT, default=2)
    o.add_argument("--box-prob", type=_number(float, lo=0.0, hi=1.0), default=0.5)
    o.add_argument(
        "--point-margin",
        type=_COUNT,
        default=0,
        help="first points only where a (2m+1)^2 square around them is inside the mask",
    )
    o.add_argument(
        "--sample-by",
        default="image",
        choices=tdata.SAMPLING,
        help="draw batch images uniformly, or in proportion to their mask counts so that "
        "every mask trains equally often (as the per-mask held-out IoU weighs them)",
    )
    o.add_argument(
        "--augment", action="store_true", help="random flips/transposes and colour jitter of each training image"
    )
    o.add_argument("--seed", type=int, default=0)
    r = p.add_argument_group("run")
    r.add_argument("--out", required=True)
    r.add_argument("--eval-every", type=_POSITIVE, default=100)
    r.add_argument("--checkpoint-every", type=_POSITIVE, default=250)
    r.add_argument("--resume", action="store_true")
    r.add_argument("--stop-after", type=_COUNT, default=0, help="stop (after a checkpoint) at this step")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if not (a.synthetic or a.masks or a.coco):
        p.error("give --synthetic N, or --images with --masks or --coco")
    if (a.masks or a.coco) and not a.images:
        p.error("--masks and --coco need --images")
    if a.augment and a.encoder == "frozen":
        p.error("--augment changes images, but --encoder frozen trains on embeddings cached once")
    if a.decoder == "hq" and a.encoder != "frozen":
        p.error("--decoder hq trains SAM-HQ's parts alone: it needs --encoder frozen")
    if not a.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no plots (pip install 'sam-jax[train]')")
            a.no_plots = True
    return a


def load_model(a):
    dtype = jnp.bfloat16 if a.bf16 else None
    if a.weights:
        base, params = sam_jax.load(a.weights)
        cfg = base.config
    else:
        cfg = SCRATCH_CONFIGS.get(a.model) or sam_jax.get_config(a.model)
        params = sam_jax.init_params(sam_jax.build_sam(cfg), jax.random.PRNGKey(a.seed))
    model = sam_jax.build_sam(cfg, dtype=dtype, remat_encoder=a.remat)
    if a.encoder == "lora":
        model, params = train.add_lora(model, params, jax.random.PRNGKey(a.seed + 1), a.lora_rank, a.lora_alpha)
    return model, params


def load_data(a, image_size: int):
    if a.synthetic:
        tr = tdata.prepare(*synthetic_dataset(a.synthetic, image_size, a.seed, "train"), image_size)
        va = tdata.prepare(*synthetic_dataset(a.heldout, image_size, a.seed, "heldout"), image_size)
        return tr, va
    full = (
        tdata.load_coco(a.coco, a.images, image_size)
        if a.coco
        else tdata.load_mask_folder(a.images, a.masks, image_size)
    )
    n_val = max(1, int(round(a.val_fraction * len(full)))) if len(full) > 1 else 0
    order = np.random.default_rng(a.seed).permutation(len(full))

    def pick(idx):
        return tdata.Samples(
            full.images[idx], full.sizes[idx], [full.masks[i] for i in idx], [full.names[i] for i in idx]
        )

    return pick(order[n_val:]), pick(order[:n_val] if n_val else order[:1])


def main(argv=None) -> Dict[str, List[float]]:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    model, params = load_model(a)
    if (a.decoder == "hq") != model.config.hq:
        print(
            "finetune.py: error: "
            + ("--decoder hq needs SAM-HQ weights" if a.decoder == "hq" else "SAM-HQ weights need --decoder hq"),
            file=sys.stderr,
        )
        raise SystemExit(2)
    s = model.config.image_size
    t0 = time.perf_counter()
    tr, va = load_data(a, s)
    print(f"data: {len(tr)} train / {len(va)} held-out images at {s}px ({time.perf_counter() - t0:.1f} s)")

    cfg = train.TrainConfig(
        learning_rate=a.lr,
        weight_decay=a.weight_decay,
        warmup_steps=a.warmup,
        decay_steps=a.steps,
        encoder=a.encoder,
        decoder=a.decoder,
        loss=train.HQ_LOSS if a.decoder == "hq" else train.LossConfig(),
        prompts=train.PromptConfig(a.corrective_points, a.no_point_rounds, a.box_prob, point_margin=a.point_margin),
        remat_rounds=a.remat,
    )
    tx = train.make_optimizer(cfg, params)
    state = train.TrainState.create(params, tx)
    step_fn = train.make_train_step(model, tx, cfg)
    ckpt = Checkpointer(os.path.join(a.out, "checkpoints"))
    hist_path = os.path.join(a.out, "history.json")
    history: Dict[str, List[float]] = {
        "step": [],
        "loss": [],
        "iou_first": [],
        "iou_last": [],
        "eval_step": [],
        "eval_iou": [],
        "time": [],
    }
    if a.resume and ckpt.latest_step() is not None:
        state = ckpt.restore(state)
        with open(hist_path) as f:
            history = {k: v for k, v in json.load(f).items()}
        n = int(state.step)
        for k in ("step", "loss", "iou_first", "iou_last", "time"):
            history[k] = history[k][:n]
        keep = [i for i, st in enumerate(history["eval_step"]) if st <= n]
        history["eval_step"] = [history["eval_step"][i] for i in keep]
        history["eval_iou"] = [history["eval_iou"][i] for i in keep]
        print(f"resumed at step {n}")

    # {"embeddings"} (SAM-HQ: and "interm_embeddings"), what a frozen-encoder step reads.
    encode = jax.jit(lambda p, im, sz: train.encoder_outputs(model, p, preprocess_padded(im, sz)))
    cached = None
    if a.encoder == "frozen":  # the research path: embeddings once, then many decoder epochs
        tag = f"{a.weights or a.model}|{model.config.to_json()}|{len(tr)}|{a.seed}"
        t1 = time.perf_counter()
        cached = tdata.cache_embeddings(
            lambda im, sz: encode(state.params, im, sz), tr, 8, os.path.join(a.out, "train_embeddings.npz"), tag
        )
        print(f"cached {cached['embeddings'].shape} embeddings in {time.perf_counter() - t1:.1f} s")
    va_gt = np.concatenate(va.masks)
    va_owner = np.concatenate([np.full(len(m), i) for i, m in enumerate(va.masks)])
    va_pts = tdata.center_points(va_gt)

    def evaluate(p, return_masks=False):
        enc = tdata.cache_embeddings(lambda im, sz: encode(p, im, sz), va, 8)
        interm = enc["interm_embeddings"][va_owner] if model.config.hq else None
        return single_point_iou(
            model,
            _plain(p, a),
            enc["embeddings"][va_owner],
            va_gt,
            va_pts,
            return_masks=return_masks,
            interm_embeddings=interm,
        )

    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    start = int(state.step)
    bar = (
        tqdm(total=a.steps, initial=start, disable=a.no_progress or tqdm is None, dynamic_ncols=True) if tqdm else None
    )
    base_key = jax.random.PRNGKey(a.seed)
    prep = jax.jit(preprocess_padded)

    def make_batch(t):
        rng = np.random.default_rng([a.seed, t])  # batch t is a function of t: resumable
        idx = tdata.sample_images(rng, tr, a.batch_size, a.sample_by)
        masks = tdata.sample_masks(rng, tr, idx, a.objects)
        if cached is not None:
            return {"masks": jnp.asarray(masks), **{n: jnp.asarray(v[idx]) for n, v in cached.items()}}
        images, sizes = tr.images[idx], tr.sizes[idx]
        if a.augment:
            images, masks = tdata.augment(rng, images, sizes, masks)
        return {"masks": jnp.asarray(masks), "images": prep(jnp.asarray(images), jnp.asarray(sizes))}

    def record(t, met):  # reading a step's metrics waits for that step to finish
        met = {k: float(v) for k, v in jax.device_get(met).items()}
        history["step"].append(t + 1), history["time"].append(time.perf_counter() - t_run)
        for k in ("loss", "iou_first", "iou_last"):
            history[k].append(met[k])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{met['loss']:.3f}",
                iou=f"{met['iou_first']:.3f}",
                eval_iou=f"{history['eval_iou'][-1]:.3f}" if history["eval_iou"] else "-",
            )

    t_run = time.perf_counter() - (history["time"][-1] if history["time"] else 0.0)
    end = min(a.steps, a.stop_after) if a.stop_after else a.steps
    pending = None  # the step in flight: its metrics are read after the next step is queued, so
    for t in range(start, end):  # the host builds batch t + 1 while step t runs
        state, met = step_fn(state, make_batch(t), jax.random.fold_in(base_key, t))
        if pending is not None:
            record(*pending)
        pending = (t, met)
        do_eval = (t + 1) % a.eval_every == 0 or t + 1 == a.steps
        do_save = (t + 1) % a.checkpoint_every == 0 or t + 1 in (end, a.steps)
        if not (do_eval or do_save):
            continue
        record(*pending)
        pending = None
        if do_eval:
            history["eval_step"].append(t + 1)
            history["eval_iou"].append(float(np.mean(evaluate(state.params))))
            if a.no_progress:
                print(
                    f"step {t + 1}: loss {np.mean(history['loss'][-a.eval_every :]):.4f}, train IoU "
                    f"{np.mean(history['iou_first'][-a.eval_every :]):.3f}, held-out IoU "
                    f"{history['eval_iou'][-1]:.3f}, {history['time'][-1]:.0f} s",
                    flush=True,
                )
            elif bar is not None:
                bar.set_postfix(
                    loss=f"{history['loss'][-1]:.3f}",
                    iou=f"{history['iou_first'][-1]:.3f}",
                    eval_iou=f"{history['eval_iou'][-1]:.3f}",
                )
        if do_save:
            ckpt.save(state, wait=False)  # written in the background while training goes on
            with open(hist_path, "w") as f:
                json.dump(history, f)
    if bar is not None:
        bar.close()
    ckpt.close()
    if int(state.step) < a.steps:
        print(f"stopped at step {int(state.step)} (resume with --resume)")
        return history
    final = _plain(state.params, a)
    sam_jax.save(os.path.join(a.out, "params.safetensors"), jax.device_get(final), model.config)
    ious, preds = evaluate(state.params, return_masks=True)
    summary = {
        "heldout_iou": float(np.mean(ious)),
        "heldout_masks": int(len(ious)),
        "wall_s": history["time"][-1] if history["time"] else 0.0,
        "steps": a.steps,
    }
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary))
    if not a.no_plots:
        from finetune_plots import plot_curves, plot_overlays

        plot_curves(history, os.path.join(a.out, "curves.png"))
        plot_overlays(va, va_owner, va_gt, va_pts, preds, ious, os.path.join(a.out, "overlays.png"))
    return history


def _plain(params, a):
    """Params the plain model understands (LoRA adapters merged)."""
    return train.merge_lora(params, a.lora_alpha) if a.encoder == "lora" else params


if __name__ == "__main__":
    main()
