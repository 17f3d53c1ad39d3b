"""The training objective: one decoder call's loss, and a whole simulated interactive episode.

Shapes: P prompts (one per ground-truth mask); embeddings (P, h, w, C) NHWC, one per prompt (or
(1, h, w, C) shared); ground-truth masks (P, S, S) in the model-input frame. See `losses` for the
resolution the losses are computed at and `prompts` for how prompts are simulated.

SAM-HQ (`hq_features` given): the loss is on the HQ mask alone, decoded with `hq_token_only=True`
and single-mask output, as the HQ-SAM paper trains (its training script: `multimask_output=False,
hq_token_only=True`, BCE + dice on that mask; `losses.HQ_LOSS`). hq_features are
`Sam.hq_features` of the image: computed from trainable parameters, so inside the
gradient (see `step.make_train_step`).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ..modeling import PAD_LABEL, Sam
from .losses import LossConfig, sam_loss, upsample_logits
from .prompts import (
    PromptConfig,
    mask_boxes,
    noisy_boxes,
    point_schedule,
    sample_corrective_points,
    sample_foreground_points,
)

Params = Dict[str, Any]


def hq_features(model: Sam, params: Params, embeddings: jax.Array, interm_embeddings: jax.Array) -> jax.Array:
    """SAM-HQ's per-image HQ features from the frozen encoder's outputs (`step.encoder_outputs`):
    embeddings (B, h, w, C) and interm_embeddings (B, h, w, encoder width) NHWC -> (B, 4h, 4w,
    C/8) NHWC float32, what `decode_loss` / `interactive_loss` take. Differentiable in params
    (embedding_encoder and compress_vit_feat are trained)."""
    return model.apply({"params": params}, embeddings, interm_embeddings, method="hq_features")


def decode_loss(
    model: Sam,
    params: Params,
    embeddings: jax.Array,
    gt_masks: jax.Array,
    point_coords: Optional[jax.Array] = None,
    point_labels: Optional[jax.Array] = None,
    boxes: Optional[jax.Array] = None,
    mask_inputs: Optional[jax.Array] = None,
    multimask_output: bool = True,
    loss_config: LossConfig = LossConfig(),
    hq_features: Optional[jax.Array] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """`Sam.decode` on given prompts, then `sam_loss` against gt_masks (P, S, S).

    Prompts are as `Sam.decode` takes them (model-input frame). SAM-HQ: hq_features (1 or P,
    4h, 4w, C/8) NHWC, and the logits are the HQ mask alone (`hq_token_only=True`, M = 1).
    Returns (scalar loss, aux) where aux holds `sam_loss`'s per-prompt terms plus "logits"
    (P, M, S/4, S/4) and "iou_pred" (P, M).
    """
    hq = {} if hq_features is None else {"hq_features": hq_features, "hq_token_only": True}
    logits, iou = model.apply(
        {"params": params},
        embeddings,
        point_coords,
        point_labels,
        boxes,
        mask_inputs,
        multimask_output=multimask_output,
        method="decode",
        **hq,
    )
    loss, aux = sam_loss(logits, iou, gt_masks, loss_config)
    return loss, {**aux, "logits": logits, "iou_pred": iou}


def _episode(
    model: Sam,
    params: Params,
    embeddings: jax.Array,
    gt: jax.Array,
    key: jax.Array,
    pc: PromptConfig,
    lc: LossConfig,
    use_box: bool,
    remat_rounds: bool,
    hq_features: Optional[jax.Array],
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    p, s = gt.shape[0], gt.shape[-1]
    k_first, k_sched, k_rounds = jax.random.split(key, 3)
    coords = jnp.zeros((p, pc.point_slots, 2), jnp.float32)
    labels = jnp.full((p, pc.point_slots), PAD_LABEL, jnp.int32)
    if use_box:
        boxes = noisy_boxes(k_first, mask_boxes(gt), s, pc.box_noise, pc.box_noise_max_px)
    else:
        boxes = None
        c0, l0 = sample_foreground_points(k_first, gt, pc.point_margin)
        coords, labels = coords.at[:, :1].set(c0), labels.at[:, :1].set(l0)

    # SAM-HQ trains its one HQ mask, which multimask output does not change (the paper: single).
    multimask = pc.multimask_first and hq_features is None
    loss0, aux0 = decode_loss(model, params, embeddings, gt, coords, labels, boxes, None, multimask, lc, hq_features)
    # The next round sees the mask a user would: the one with the highest predicted IoU.
    pick = jnp.argmax(aux0["iou_pred"], axis=1)
    prev = jnp.take_along_axis(aux0["logits"], pick[:, None, None, None], axis=1)[:, 0]
    metrics = {"loss_first": loss0, "iou_first": jnp.mean(aux0["iou_of_predicted_best"])}
    if hq_features is None:  # SAM-HQ's IoU prediction is its SAM token's, not the HQ mask's: no figure
        metrics["iou_mse_first"] = jnp.mean(aux0["iou_mse"])
    if pc.later_rounds == 0:
        return loss0, {**metrics, "loss": loss0, "iou_last": metrics["iou_first"]}

    def round_(carry, xs):
        coords, labels, n_points, prev = carry
        add, k = xs
        prev = jax.lax.stop_gradient(prev)  # no backprop into earlier rounds through mask inputs
        pred = upsample_logits(prev, s) > 0.0
        c, lab = sample_corrective_points(k, pred, gt)
        # Slot n_points takes the new point (slot 0 is the initial point, or PAD after a box).
        slot = jnp.arange(pc.point_slots) == n_points
        write = (slot & add)[None, :]
        coords = jnp.where(write[..., None], c[:, None, :], coords)
        labels = jnp.where(write, lab[:, None], labels)
        loss, aux = decode_loss(model, params, embeddings, gt, coords, labels, boxes, prev, False, lc, hq_features)
        return (coords, labels, n_points + add.astype(jnp.int32), aux["logits"][:, 0]), (loss, aux["iou"])

    if remat_rounds:  # keep each round's carry, recompute its activations in the backward pass
        round_ = jax.checkpoint(round_, prevent_cse=False)
    schedule = point_schedule(k_sched, pc)
    keys = jax.random.split(k_rounds, pc.later_rounds)
    _, (losses, ious) = jax.lax.scan(round_, (coords, labels, jnp.int32(1), prev), (schedule, keys))
    total = (loss0 + jnp.sum(losses)) / (1 + pc.later_rounds)
    return total, {**metrics, "loss": total, "iou_last": jnp.mean(ious[-1])}


def interactive_loss(
    model: Sam,
    params: Params,
    embeddings: jax.Array,
    gt_masks: jax.Array,
    key: jax.Array,
    prompt_config: PromptConfig = PromptConfig(),
    loss_config: LossConfig = LossConfig(),
    remat_rounds: bool = False,
    hq_features: Optional[jax.Array] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Mean loss over the rounds of one simulated interactive episode per prompt.

    Args:
      model, params: the SAM module and its params (gradients flow into the prompt encoder and
        mask decoder, and into the image encoder if `embeddings` were computed from params).
      embeddings: (P, h, w, C) NHWC, one per ground-truth mask, or (1, h, w, C) shared.
      gt_masks: (P, S, S) bool, model-input frame.
      key: PRNG key; the episode is a deterministic function of it.
      remat_rounds: recompute each later round's decoder pass in the backward pass instead of
        keeping its activations: the gradient is the same, the memory of the rounds after the
        first falls from one set of activations per round to one set in all, for about one more
        decoder forward pass per round (see `TrainConfig.remat_rounds`).

    Returns:
      (scalar loss, metrics): "loss", "loss_first", "iou_first" (true IoU of the first round's
      mask with the highest predicted IoU, what a user clicking once would get), "iou_mse_first"
      (not for SAM-HQ, whose IoU prediction is not the HQ mask's) and "iou_last" (IoU after the
      last round), all scalars averaged over prompts.
    """
    if gt_masks.ndim != 3:
        raise ValueError(f"gt_masks must be (P, S, S), got shape {gt_masks.shape}")
    k_kind, k_episode = jax.random.split(key)

    def run(use_box):
        return _episode(
            model,
            params,
            embeddings,
            gt_masks,
            k_episode,
            prompt_config,
            loss_config,
            use_box,
            remat_rounds,
            hq_features,
        )

    if prompt_config.box_prob in (0.0, 1.0):
        return run(prompt_config.box_prob == 1.0)
    # Points and boxes need different decoder inputs (a box replaces the "not a point" token), so
    # the whole batch starts from one kind; both branches compile, one runs.
    use_box = jax.random.bernoulli(k_kind, prompt_config.box_prob)
    loss, metrics = jax.lax.cond(use_box, lambda: run(True), lambda: run(False))
    return loss, {**metrics, "box_first": use_box.astype(jnp.float32)}
