"""The SAM training losses: values against direct float64 formulas, selection and gradient flow."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam_jax.train import LossConfig, dice_loss, mask_iou, sam_loss, sigmoid_focal_loss, upsample_logits

# float32 elementwise maths on O(1) values, averaged: a few ulp (1e-7 relative) in the worst case.
TOL = 1e-6


def _np_focal(x, t, alpha=0.25, gamma=2.0):
    x, t = x.astype(np.float64), t.astype(np.float64)
    p = 1 / (1 + np.exp(-x))
    ce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return ((alpha * t + (1 - alpha) * (1 - t)) * ce * (1 - p_t) ** gamma).mean(axis=(-2, -1))


def test_focal_and_dice_match_float64_formulas():
    rs = np.random.RandomState(0)
    x = rs.randn(3, 2, 17, 19).astype(np.float32) * 3
    t = rs.rand(3, 2, 17, 19) > 0.6
    np.testing.assert_allclose(np.asarray(sigmoid_focal_loss(x, t)), _np_focal(x, t), rtol=TOL, atol=0)
    p = 1 / (1 + np.exp(-x.astype(np.float64)))
    want = 1 - (2 * (p * t).sum((-2, -1)) + 1) / (p.sum((-2, -1)) + t.sum((-2, -1)) + 1)
    np.testing.assert_allclose(np.asarray(dice_loss(x, t)), want, rtol=TOL, atol=0)


def test_focal_hand_value_and_extremes():
    # One positive pixel at logit 0: alpha 0.25 * (1 - 0.5)^2 * ln 2.
    got = float(sigmoid_focal_loss(jnp.zeros((1, 1)), jnp.ones((1, 1))))
    assert abs(got - 0.25 * 0.25 * np.log(2)) < 1e-7
    # Confidently right: ~0; confidently wrong at logit 50: alpha_t * 50 (no overflow).
    assert float(sigmoid_focal_loss(jnp.full((1, 1), 50.0), jnp.ones((1, 1)))) < 1e-20
    assert abs(float(sigmoid_focal_loss(jnp.full((1, 1), 50.0), jnp.zeros((1, 1)))) - 0.75 * 50) < 1e-4
    assert float(dice_loss(jnp.full((8, 8), 30.0), jnp.ones((8, 8)))) < 1e-6
    assert float(dice_loss(jnp.full((8, 8), -30.0), jnp.ones((8, 8)))) > 0.98


def test_mask_iou():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 shared of 12
    np.testing.assert_allclose(np.asarray(mask_iou(a, b)), [4 / 12, 1.0])  # both empty -> 1


def test_upsample_matches_torch_bilinear():
    x = np.random.RandomState(1).randn(2, 3, 10, 10).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=(40, 40), mode="bilinear", align_corners=False).numpy()
    np.testing.assert_allclose(np.asarray(upsample_logits(jnp.asarray(x), 40)), want, rtol=0, atol=1e-6)


def _three_masks(s=32):
    yy, xx = np.mgrid[:s, :s]
    gt = (np.abs(xx - 16) < 8) & (np.abs(yy - 16) < 8)
    good = np.where(gt, 4.0, -4.0)
    logits = np.stack([np.where(xx < 16, 4.0, -4.0), good, -good])[None, :, ::4, ::4]  # (1, 3, 8, 8)
    return jnp.asarray(logits, jnp.float32), jnp.asarray(gt[None])


@pytest.mark.full  # ~8 CPU-s: the decoder's gradient compiled
def test_only_lowest_loss_mask_gets_mask_gradient_and_iou_head_all():
    logits, gt = _three_masks()
    iou_pred = jnp.array([[0.3, 0.6, 0.1]])
    loss, aux = sam_loss(logits, iou_pred, gt)
    assert int(aux["best"][0]) == 1
    g_logits, g_iou = jax.grad(lambda lo, io: sam_loss(lo, io, gt)[0], argnums=(0, 1))(logits, iou_pred)
    assert float(jnp.abs(g_logits[0, 1]).max()) > 0
    assert float(jnp.abs(g_logits[0, 0]).max()) == 0.0 and float(jnp.abs(g_logits[0, 2]).max()) == 0.0
    assert bool(jnp.all(g_iou != 0))  # the IoU head is trained on all three masks
    cfg = LossConfig()
    up = upsample_logits(logits, 32)
    want = (
        cfg.focal_weight * sigmoid_focal_loss(up[0, 1], gt[0])
        + dice_loss(up[0, 1], gt[0])
        + jnp.mean((iou_pred[0] - mask_iou(up[0] > 0, gt[0][None])) ** 2)
    )
    assert abs(float(loss) - float(want)) < 1e-6


def test_weights_are_applied():
    logits, gt = _three_masks()
    iou = jnp.zeros((1, 3))
    base, aux = sam_loss(logits, iou, gt, LossConfig(focal_weight=0, dice_weight=0, iou_weight=1))
    assert abs(float(base) - float(jnp.mean(aux["iou_mse"]))) < 1e-7
    only_focal, aux = sam_loss(logits, iou, gt, LossConfig(focal_weight=1, dice_weight=0, iou_weight=0))
    assert abs(float(only_focal) - float(aux["focal"][0])) < 1e-7


@pytest.mark.parametrize("shapes", [((1, 3, 8), (1, 32, 32)), ((1, 3, 8, 8), (2, 32, 32)), ((1, 3, 8, 8), (1, 32, 30))])
def test_bad_shapes_raise(shapes):
    lo, g = shapes
    with pytest.raises(ValueError):
        sam_loss(jnp.zeros(lo), jnp.zeros(lo[:2]), jnp.zeros(g, bool))
