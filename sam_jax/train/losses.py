"""Training losses of the SAM paper: focal + dice on mask logits (20:1), MSE on predicted IoU.

Resolution: every loss is computed in the MODEL-INPUT frame, S x S pixels (1024 x 1024 for the
official models). The decoder's low-res logits (..., S/4, S/4) are first upsampled 4x with bilinear
interpolation (half-pixel centres, no antialias: torch's `F.interpolate(mode="bilinear",
align_corners=False)`, the first step of the official mask postprocessing), then compared with the
ground-truth mask in the same frame (the image resized so its longest side is S, zero-padded
bottom/right; padding counts as background). Ground truth is never downsampled, so thin structures
keep their weight and the IoU target is the IoU users see at the input resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights of the SAM training objective.

    Args:
      focal_weight (float): weight of the sigmoid focal loss (20 in the paper).
      dice_weight (float): weight of the dice loss (1).
      iou_weight (float): weight of the IoU-prediction MSE (1).
      focal_alpha (float): focal-loss class balance for the positive class (0.25); < 0: none.
      focal_gamma (float): focal-loss focusing exponent (2); 0 with focal_alpha < 0 is plain BCE.
    """

    focal_weight: float = 20.0
    dice_weight: float = 1.0
    iou_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0


# The HQ-SAM paper's loss on the HQ mask: BCE + dice, 1:1, no IoU term (the IoU head is SAM's and
# frozen). Its training script evaluates both on 112 x 112 points sampled with Mask2Former's
# importance sampling; here they are evaluated on every pixel of the model-input frame.
HQ_LOSS = LossConfig(focal_weight=1.0, dice_weight=1.0, iou_weight=0.0, focal_alpha=-1.0, focal_gamma=0.0)


def upsample_logits(low_res: jax.Array, size: int) -> jax.Array:
    """(..., L, L) logits -> (..., size, size), bilinear with half-pixel centres, no antialias."""
    if low_res.shape[-1] == size and low_res.shape[-2] == size:
        return low_res
    lead = low_res.shape[:-2]
    return jax.image.resize(low_res, (*lead, size, size), method="linear", antialias=False)


def sigmoid_focal_loss(logits: jax.Array, targets: jax.Array, alpha: float = 0.25, gamma: float = 2.0) -> jax.Array:
    """Focal loss (Lin et al. 2017) on logits (..., H, W) vs {0, 1} targets, mean over pixels -> (...).

    loss = alpha_t * (1 - p_t)^gamma * BCE(logits, targets), p = sigmoid(logits).
    """
    t = targets.astype(logits.dtype)
    p = jax.nn.sigmoid(logits)
    # Stable BCE with logits: max(x, 0) - x t + log(1 + exp(-|x|)).
    ce = jnp.maximum(logits, 0.0) - logits * t + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    loss = ce
    if gamma != 0:  # (1 - p_t) ** 0 has a NaN gradient where p_t rounds to 1
        p_t = p * t + (1.0 - p) * (1.0 - t)
        loss = ce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * t + (1.0 - alpha) * (1.0 - t)) * loss
    return loss.mean(axis=(-2, -1))


def dice_loss(logits: jax.Array, targets: jax.Array, smooth: float = 1.0) -> jax.Array:
    """Soft dice loss on logits (..., H, W) vs {0, 1} targets -> (...):
    1 - (2 sum(p t) + smooth) / (sum(p) + sum(t) + smooth), p = sigmoid(logits)."""
    t = targets.astype(logits.dtype)
    p = jax.nn.sigmoid(logits)
    num = 2.0 * jnp.sum(p * t, axis=(-2, -1))
    den = jnp.sum(p, axis=(-2, -1)) + jnp.sum(t, axis=(-2, -1))
    return 1.0 - (num + smooth) / (den + smooth)


def mask_iou(pred: jax.Array, target: jax.Array) -> jax.Array:
    """IoU of boolean masks (..., H, W) -> (...) float32; 1.0 where both masks are empty."""
    pred, target = pred.astype(bool), target.astype(bool)
    inter = jnp.sum(pred & target, axis=(-2, -1)).astype(jnp.float32)
    union = jnp.sum(pred | target, axis=(-2, -1)).astype(jnp.float32)
    return jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 1.0)


def sam_loss(
    low_res_logits: jax.Array, iou_pred: jax.Array, gt_masks: jax.Array, config: LossConfig = LossConfig()
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """The SAM objective for one decoder call.

    Args:
      low_res_logits: (P, M, L, L) decoder logits, M = 3 (multimask) or 1, L = S / 4.
      iou_pred: (P, M) predicted IoUs.
      gt_masks: (P, S, S) bool / {0, 1} ground truth in the model-input frame.
      config: loss weights.

    Returns:
      the scalar loss, mean over prompts of [mask loss of the lowest-loss mask + iou_weight x
      mean over ALL M masks of (iou_pred - IoU(logits > 0, gt))^2], and per-prompt terms (P,):
      "focal", "dice", "iou_mse", "iou" (true IoU of the selected mask), "best" (its index) and
      "iou_of_predicted_best" (true IoU of the mask with the highest predicted IoU).
    """
    if low_res_logits.ndim != 4 or gt_masks.ndim != 3:
        raise ValueError(
            f"low_res_logits must be (P, M, L, L) and gt_masks (P, S, S); got "
            f"{low_res_logits.shape} and {gt_masks.shape}"
        )
    if gt_masks.shape[-1] != gt_masks.shape[-2] or gt_masks.shape[0] != low_res_logits.shape[0]:
        raise ValueError(f"gt_masks {gt_masks.shape} does not fit low_res_logits {low_res_logits.shape}")
    # At least float32 (bf16 compute is upcast); float64 stays float64 (exact-gradient references).
    dtype = jnp.promote_types(low_res_logits.dtype, jnp.float32)
    logits = upsample_logits(low_res_logits.astype(dtype), gt_masks.shape[-1])
    gt = gt_masks[:, None]
    focal = sigmoid_focal_loss(logits, gt, config.focal_alpha, config.focal_gamma)  # (P, M)
    dice = dice_loss(logits, gt)
    per_mask = config.focal_weight * focal + config.dice_weight * dice
    # Only the lowest-loss mask is trained (argmin is integer-valued: no gradient through it).
    best = jnp.argmin(per_mask, axis=1)
    pick = lambda x: jnp.take_along_axis(x, best[:, None], axis=1)[:, 0]  # noqa: E731
    true_iou = jax.lax.stop_gradient(mask_iou(logits > 0.0, gt))  # (P, M)
    iou_mse = jnp.mean((iou_pred.astype(dtype) - true_iou) ** 2, axis=1)  # every mask
    loss = jnp.mean(pick(per_mask) + config.iou_weight * iou_mse)
    chosen = jnp.argmax(iou_pred, axis=1)
    aux = {
        "focal": pick(focal),
        "dice": pick(dice),
        "iou_mse": iou_mse,
        "iou": pick(true_iou),
        "best": best,
        "iou_of_predicted_best": jnp.take_along_axis(true_iou, chosen[:, None], axis=1)[:, 0],
    }
    return loss, aux
