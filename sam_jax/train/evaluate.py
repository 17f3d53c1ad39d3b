"""Evaluation: IoU from one positive point, the mask chosen by the predicted IoU."""

from __future__ import annotations

from functools import partial
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling import Sam
from .losses import mask_iou, upsample_logits

Params = Dict[str, Any]


@partial(jax.jit, static_argnums=(0,))
def _single_point(model: Sam, params: Params, embeddings: jax.Array, gt: jax.Array, points: jax.Array):
    s = gt.shape[-1]
    labels = jnp.ones(points.shape[:1] + (1,), jnp.int32)
    logits, iou_pred = model.apply(
        {"params": params}, embeddings, points[:, None], labels, multimask_output=True, method="decode"
    )
    best = jnp.argmax(iou_pred, axis=1)
    chosen = jnp.take_along_axis(logits, best[:, None, None, None], axis=1)[:, 0]
    pred = upsample_logits(chosen, s) > 0.0
    return mask_iou(pred, gt), pred


def single_point_iou(
    model: Sam,
    params: Params,
    embeddings: np.ndarray,
    gt_masks: np.ndarray,
    points: np.ndarray,
    batch_size: int = 16,
    return_masks: bool = False,
):
    """IoU of the predicted mask from one positive point per ground-truth mask.

    Args:
      embeddings: (P, h, w, C) NHWC, one per ground-truth mask.
      gt_masks: (P, S, S) bool, model-input frame.
      points: (P, 2) (x, y) in the model-input frame (e.g. `data.center_points`).
      batch_size: prompts per compiled call (the last chunk is padded).

    Returns (P,) IoUs (and the (P, S, S) predicted masks if `return_masks`), numpy. Of the three
    multimask outputs the one with the highest predicted IoU is scored, as a user would see it.
    """
    n = len(gt_masks)
    if not (len(embeddings) == len(points) == n):
        raise ValueError(
            f"embeddings, gt_masks and points must have the same length, got {len(embeddings)}, {n} and {len(points)}"
        )
    ious, preds = [], []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        e, g, p = embeddings[sl], gt_masks[sl], points[sl]
        pad = batch_size - len(g)
        if pad:
            e = np.concatenate([e, np.repeat(e[-1:], pad, 0)])
            g = np.concatenate([g, np.repeat(g[-1:], pad, 0)])
            p = np.concatenate([p, np.repeat(p[-1:], pad, 0)])
        iou, pred = _single_point(model, params, jnp.asarray(e), jnp.asarray(g), jnp.asarray(p, jnp.float32))
        ious.append(np.asarray(iou)[: batch_size - pad])
        if return_masks:
            preds.append(np.asarray(pred)[: batch_size - pad])
    ious = np.concatenate(ious)
    return (ious, np.concatenate(preds)) if return_masks else ious
