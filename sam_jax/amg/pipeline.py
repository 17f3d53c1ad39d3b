"""The jitted per-crop stages of the automatic mask generator, sharded over devices.

A *job* is one crop of one image (the whole image is the layer-0 crop). Jobs run in groups of
`len(devices)`, one job per device: every stage below is written for ONE job and lifted with
`shard_map` over a 1-D mesh whose axis "jobs" carries the group, so each device runs exactly the
program a single-device run would (results do not depend on the device count).

Per job, on the device:
  encode   uint8 (S, S, 3) crop resized into the model frame -> embedding (1, e, e, C) (SAM-HQ:
           with the crop's HQ features);
  decode   one batch of B grid points -> IoU (B * k,) and, for points with a mask above the
           IoU threshold only, low-res logits (B * k, L, L) (`Sam.decode_tokens`, then
           `Sam.decode_masks` for those points); k = 3 masks per point (SAM-HQ: 1);
  filter   IoU filter BEFORE upsampling; survivors upsampled to the crop's full resolution in
           chunks of K masks (fixed shapes, validity-masked padding) and reduced to stability
           score, area and box; stability and crop-edge filters. Only indices and stats leave;
  append   the batch's survivors (low-res logits + stats) into a per-job buffer of capacity
           `cap` (grown by the host between batches when an upper bound says it could overflow);
  nms      greedy box NMS over the buffer (score = predicted IoU).
Final masks are re-upsampled from the buffer for the kept slots only, thresholded and bit-packed
before they travel to the host (`final_masks`).

Frames: point coordinates are model-input pixels (the S x S frame); boxes are inclusive pixel
indices of the CROP; `crop_box` is [x0, y0, x1, y1] of the crop in the image; sizes are (h, w).
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ..backend import jit_tuned
from ..functional import encode_images, encode_images_hq
from ..modeling import Sam, image_context
from ..transforms import upscale_masks
from . import ops

Buffers = Dict[str, jax.Array]
AXIS = "jobs"
MASK_THRESHOLD = 0.0


def _lift(fn: Callable) -> Callable:
    """A one-job function -> the same on a leading job axis of size 1 (the per-device shard)."""

    def lifted(*args):
        squeeze = jax.tree_util.tree_map(lambda x: x[0], args)
        return jax.tree_util.tree_map(lambda x: x[None], fn(*squeeze))

    return lifted


_CACHE: Dict[Any, Callable] = {}


def sharded(
    key: Tuple[Any, ...], fn: Callable, mesh: Mesh, n_replicated: int, donate: Tuple[int, ...] = (), tuned: bool = False
) -> Callable:
    """jit(shard_map(fn)) over `mesh`: the first `n_replicated` args are replicated (params,
    thresholds), the rest carry the job axis. Cached per (key, mesh); `key` names `fn` and its
    static arguments. tuned: compile with `backend.jit_tuned` (XLA's own fusions on CPU)."""
    key = (*key, mesh)
    if key not in _CACHE:

        def body(*args):
            rep, per_job = args[:n_replicated], args[n_replicated:]
            return _lift(lambda *pj: fn(*rep, *pj))(*per_job)

        def specs(*args):
            return tuple([P()] * n_replicated + [P(AXIS)] * (len(args) - n_replicated))

        def call(*args):
            return jax.shard_map(body, mesh=mesh, in_specs=specs(*args), out_specs=P(AXIS), check_vma=False)(*args)

        _CACHE[key] = (jit_tuned if tuned else jax.jit)(call, donate_argnums=donate)
    return _CACHE[key]


def put(x: Any, mesh: Mesh) -> Any:
    """Host arrays with a leading job axis -> device arrays sharded one job per device."""
    return jax.device_put(x, NamedSharding(mesh, P(AXIS)))


def replicate(x: Any, mesh: Mesh) -> Any:
    return jax.device_put(x, NamedSharding(mesh, P()))


# --- one-job stages ---


def encode_job(model: Sam, params, image: jax.Array, size: jax.Array) -> Any:
    """uint8 (S, S, 3) crop resized into the model frame, its (h, w) -> embedding (1, e, e, C);
    SAM-HQ: (embedding, HQ features (1, 4e, 4e, C/8)), what `decode_job` takes."""
    if model.config.hq:
        return encode_images_hq(model, params, image[None], size[None])
    return encode_images(model, params, image[None], size[None])


def masks_per_point(model: Sam) -> int:
    """Masks the generator decodes per grid point (multimask): 3, or SAM-HQ's 1."""
    return 1 if model.config.hq else model.config.num_multimask_outputs


def decode_tokens(
    model: Sam, params, embedding: jax.Array, coords: jax.Array
) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """`Sam.decode_tokens` for B single foreground points (B, 2) in the model frame against one
    embedding (1, e, e, C), multimask: IoU (B, 3), hypernetwork outputs (B, 3, C/8) and image
    tokens (B, e, e, C) (SAM-HQ: IoU (B, 1), hypernetwork outputs (B, 2, C/8)). Layer 0's image
    side is projected once for the batch (`modeling.image_context`), not once per point."""
    pe = model.apply({"params": params}, method="get_dense_pe")
    context = image_context(params, embedding, pe, model.config.decoder_num_heads)
    b = coords.shape[0]
    return model.apply(
        {"params": params},
        embedding,
        coords[:, None, :],
        jnp.ones((b, 1), jnp.int32),
        multimask_output=True,
        image_context=context,
        image_pe=pe,
        method="decode_tokens",
    )


def decode_masks(
    model: Sam,
    params,
    image_tokens: jax.Array,
    hyper: jax.Array,
    hq_features: Optional[jax.Array] = None,
    hq_token_only: bool = False,
) -> jax.Array:
    """`Sam.decode_masks`: rows of `decode_tokens`' image tokens (K, e, e, C) and hypernetwork
    outputs (K, 3, C/8) -> low-res logits (K, 3, L, L) float32 (SAM-HQ: with the crop's HQ
    features, SAM's mask + the HQ mask, (K, 1, L, L), as SAM-HQ's generator asks its predictor;
    the HQ mask alone with hq_token_only, static)."""
    if hq_features is None:
        return model.apply({"params": params}, image_tokens, hyper, method="decode_masks")
    return model.apply({"params": params}, image_tokens, hyper, hq_features, hq_token_only, method="decode_masks")


def decode_job(
    model: Sam,
    thresholds: jax.Array,
    params,
    embedding: Any,
    coords: jax.Array,
    valid: jax.Array,
    *,
    chunk: int,
    hq_token_only: bool = False,
) -> Tuple[jax.Array, jax.Array]:
    """B single foreground points (B, 2) in the model frame, valid (B,) -> low-res logits
    (B * k, L, L) and IoU predictions (B * k,), point-major (the official `flatten(0, 1)`); k is
    `masks_per_point`. embedding: `encode_job`'s output (SAM-HQ: with the crop's HQ features;
    hq_token_only, static: the HQ masks alone).

    The transformer runs for every point (IoU predictions need it), but the output upscaling only
    for points with a mask above the IoU threshold, `chunk` points at a time: the other points'
    logits stay 0 and are never read, since the filter drops their masks.
    """
    b = coords.shape[0]
    embedding, hq_features = embedding if model.config.hq else (embedding, None)
    iou, hyper, tokens = decode_tokens(model, params, embedding, coords)
    need = valid & jnp.any((iou > thresholds[0]) | (thresholds[0] <= 0.0), axis=1)
    order, n = ops.compact_order(need)
    order = jnp.concatenate([order, jnp.full((chunk,), b, jnp.int32)])  # b: out of range, dropped
    mask_side = model.config.mask_input_size
    low = jnp.zeros((b, iou.shape[1], mask_side, mask_side), jnp.float32)

    def body(c, low):
        idx = jax.lax.dynamic_slice(order, (c * chunk,), (chunk,))
        safe = jnp.minimum(idx, b - 1)
        part = decode_masks(model, params, tokens[safe], hyper[safe], hq_features, hq_token_only)
        return low.at[jnp.where(jnp.arange(chunk) + c * chunk < n, idx, b)].set(part, mode="drop")

    low = jax.lax.fori_loop(0, (n + chunk - 1) // chunk, body, low)
    return low.reshape(-1, mask_side, mask_side), iou.reshape(-1)


def filter_job(
    thresholds: jax.Array,
    low: jax.Array,
    iou: jax.Array,
    valid: jax.Array,
    base: jax.Array,
    rows: Tuple[jax.Array, jax.Array],
    cols: Tuple[jax.Array, jax.Array],
    crop_hw: jax.Array,
    crop_box: jax.Array,
    orig_hw: jax.Array,
    *,
    chunk: int,
) -> Dict[str, jax.Array]:
    """One decoded batch -> its surviving masks, in the official order, with their stats.

    Args:
      thresholds: float32 (3,) [pred_iou_thresh, stability_score_thresh, stability_score_offset];
        a threshold <= 0 disables its filter, as officially.
      low: (M, L, L) logits; iou: (M,); valid: (M,) bool (False for the padding of the last batch);
      base: int32 () mask id of low[0] (point index * k + mask index over the whole crop, k the
        `masks_per_point`).
      rows, cols: `transforms.mask_upscale_taps` of the crop, padded to (Hp,) / (Wp,).
      crop_hw: int32 (2,) the crop's (h, w); crop_box: int32 (4,); orig_hw: int32 (2,) image (H, W).
      chunk: static K, masks upsampled at once ((K, Hp, Wp) float32 is the memory high-water mark).

    Returns a dict of (M,) arrays, survivors first: "sel" (index into low), "iou", "stab", "box"
    (M, 4) inclusive in the crop frame, "area", "src" (mask id), and "n" (int32 survivors).
    """
    iou_t, stab_t, offset = thresholds[0], thresholds[1], thresholds[2]
    m = low.shape[0]
    hp, wp = rows[0].shape[0], cols[0].shape[0]
    vm = ops.pixel_validity(crop_hw, (hp, wp))
    keep = valid & ((iou > iou_t) | (iou_t <= 0.0))
    order, n = ops.compact_order(keep)
    padded_order = jnp.concatenate([order, jnp.zeros((chunk,), jnp.int32)])

    def body(c, carry):
        start = c * chunk
        idx = jax.lax.dynamic_slice(padded_order, (start,), (chunk,))
        full = upscale_masks(low[idx], rows, cols)  # (K, Hp, Wp), 0 in the padding
        stats = ops.mask_stats(full, vm, offset)
        return tuple(
            jax.lax.dynamic_update_slice(acc, s, (start,) + (0,) * (s.ndim - 1)) for acc, s in zip(carry, stats)
        )

    zeros = jnp.zeros((m + chunk,), jnp.int32)
    init = (zeros, zeros, zeros, jnp.zeros((m + chunk, 4), jnp.int32))
    hi, lo, area, box = jax.lax.fori_loop(0, (n + chunk - 1) // chunk, body, init)
    hi, lo, area, box = hi[:m], lo[:m], area[:m], box[:m]
    stab = ops.stability_score(hi, lo)
    keep2 = (jnp.arange(m) < n) & ((stab >= stab_t) | (stab_t <= 0.0))
    keep2 &= ~ops.near_crop_edge(box, crop_box, orig_hw)
    o2, n2 = ops.compact_order(keep2)
    sel = order[o2]
    return {"sel": sel, "iou": iou[sel], "stab": stab[o2], "box": box[o2], "area": area[o2], "src": base + sel, "n": n2}


BUFFER_KEYS = ("iou", "stab", "box", "area", "src")


def empty_buffers(cap: int, low_size: int) -> Buffers:
    """Host zeros for one job's buffers of capacity `cap` (the job axis is added by the caller)."""
    return {
        "low": np.zeros((cap, low_size, low_size), np.float32),
        "iou": np.zeros(cap, np.float32),
        "stab": np.zeros(cap, np.float32),
        "box": np.zeros((cap, 4), np.int32),
        "area": np.zeros(cap, np.int32),
        "src": np.zeros(cap, np.int32),
        "count": np.zeros((), np.int32),
    }


def append_job(bufs: Buffers, low: jax.Array, out: Dict[str, jax.Array]) -> Buffers:
    """Writes the batch's `out["n"]` survivors after the buffer's `count` entries (in place when
    the buffers are donated). The caller guarantees count + n <= capacity."""
    cap = bufs["low"].shape[0]
    m = out["sel"].shape[0]
    i = jnp.arange(m)
    pos = jnp.where(i < out["n"], bufs["count"] + i, cap)  # out of range: dropped
    new = {"low": bufs["low"].at[pos].set(low[out["sel"]], mode="drop")}
    for k in BUFFER_KEYS:
        new[k] = bufs[k].at[pos].set(out[k], mode="drop")
    new["count"] = bufs["count"] + out["n"]
    return new


def grow_job(bufs: Buffers, *, cap: int) -> Buffers:
    """The same buffers with capacity `cap` (zero-padded)."""
    out = {}
    for k, v in bufs.items():
        if k == "count":
            out[k] = v
        else:
            out[k] = jnp.pad(v, [(0, cap - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
    return out


def nms_job(threshold: jax.Array, bufs: Buffers) -> Tuple[jax.Array, jax.Array]:
    """Box NMS inside a crop (score = predicted IoU): kept slot indices (cap,) and their count."""
    cap = bufs["iou"].shape[0]
    valid = jnp.arange(cap) < bufs["count"]
    return ops.nms(bufs["box"].astype(jnp.float32), bufs["iou"], valid, threshold)


@partial(jax.jit, static_argnames=("packed",))
def final_masks(low: jax.Array, idx: jax.Array, rows, cols, crop_hw: jax.Array, packed: bool = True) -> jax.Array:
    """Re-upsamples the kept slots `idx` (P,) of one job's buffer ((1,) cap, L, L) to the crop's
    full resolution and thresholds them: bool (P, Hp, Wp), or bit-packed along the width
    (uint8 (P, Hp, ceil(Wp / 8)), `np.unpackbits(..., axis=-1)` restores it)."""
    low = low.reshape(-1, *low.shape[-2:])
    full = upscale_masks(low[idx], rows, cols)
    hp, wp = full.shape[-2:]
    masks = (full > MASK_THRESHOLD) & ops.pixel_validity(crop_hw, (hp, wp))
    return jnp.packbits(masks, axis=-1) if packed else masks


@jax.jit
def nms_single(
    boxes: jax.Array, scores: jax.Array, valid: jax.Array, threshold: jax.Array
) -> Tuple[jax.Array, jax.Array]:
    """`ops.nms` on one device, for the cross-crop and clean-up passes (host-sized inputs)."""
    return ops.nms(boxes, scores, valid, threshold)
