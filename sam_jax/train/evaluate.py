"""Evaluation: IoU from one positive point, the mask chosen by the predicted IoU (SAM-HQ: the HQ
mask alone, the mask its recipe trains)."""

from __future__ import annotations

from functools import partial
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ..modeling import Sam
from .losses import mask_iou, upsample_logits
from .objective import hq_features

Params = Dict[str, Any]


@partial(jax.jit, static_argnums=(0,))
def _single_point(
    model: Sam, params: Params, embeddings: jax.Array, gt: jax.Array, points: jax.Array, interm: Optional[jax.Array]
):
    s = gt.shape[-1]
    labels = jnp.ones(points.shape[:1] + (1,), jnp.int32)
    hq = {}
    if interm is not None:
        hq = {"hq_features": hq_features(model, params, embeddings, interm), "hq_token_only": True}
    logits, iou_pred = model.apply(
        {"params": params}, embeddings, points[:, None], labels, multimask_output=True, method="decode", **hq
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
    interm_embeddings: Optional[np.ndarray] = None,
):
    """IoU of the predicted mask from one positive point per ground-truth mask.

    Args:
      embeddings: (P, h, w, C) NHWC, one per ground-truth mask.
      gt_masks: (P, S, S) bool, model-input frame.
      points: (P, 2) (x, y) in the model-input frame (e.g. `data.center_points`).
      batch_size: prompts per compiled call (the last chunk is padded).
      interm_embeddings: SAM-HQ (required there): (P, h, w, encoder width), the encoder's
        intermediate tokens of each embedding's image (`step.encoder_outputs`); the HQ mask alone
        is scored.

    Returns (P,) IoUs (and the (P, S, S) predicted masks if `return_masks`), numpy. Of the three
    multimask outputs the one with the highest predicted IoU is scored, as a user would see it.
    """
    n = len(gt_masks)
    if model.config.hq != (interm_embeddings is not None):
        raise ValueError(
            "interm_embeddings is required for a SAM-HQ model and only for it"
            f" (this model {'is' if model.config.hq else 'is not'} SAM-HQ)"
        )
    if interm_embeddings is not None and len(interm_embeddings) != n:
        raise ValueError(f"interm_embeddings must have one entry per mask ({n}), got {len(interm_embeddings)}")
    if not (len(embeddings) == len(points) == n):
        raise ValueError(
            f"embeddings, gt_masks and points must have the same length, got {len(embeddings)}, {n} and {len(points)}"
        )
    ious, preds = [], []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        e, g, p = embeddings[sl], gt_masks[sl], points[sl]
        m = None if interm_embeddings is None else interm_embeddings[sl]
        pad = batch_size - len(g)
        if pad:
            e, g, p = (np.concatenate([x, np.repeat(x[-1:], pad, 0)]) for x in (e, g, p))
            m = None if m is None else np.concatenate([m, np.repeat(m[-1:], pad, 0)])
        m = None if m is None else jnp.asarray(m)
        iou, pred = _single_point(model, params, jnp.asarray(e), jnp.asarray(g), jnp.asarray(p, jnp.float32), m)
        ious.append(np.asarray(iou)[: batch_size - pad])
        if return_masks:
            preds.append(np.asarray(pred)[: batch_size - pad])
    ious = np.concatenate(ious)
    return (ious, np.concatenate(preds)) if return_masks else ious
