"""The automatic mask generator honours `model.dtype`: a bf16-compute model runs end to end and
its masks agree with the fp32 model's."""

from __future__ import annotations

from collections import defaultdict

import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from sam_jax.amg import SamAutomaticMaskGenerator, pipeline
from tests.modeling.test_bf16 import products

# Every mask of every point is kept (no IoU, stability or NMS filter), so both runs return the same
# 3 masks per point and each fp32 mask can be compared with the bf16 masks of its point.
KEEP_ALL = dict(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0, box_nms_thresh=1.0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


@pytest.mark.full  # ~20 CPU-s: the AMG pipeline compiled twice (fp32, bf16)
def test_bf16_amg_runs_and_matches_fp32(tiny):
    image = skimage.data.chelsea()[:200, :260]
    bf16 = tiny.model.clone(dtype=jnp.bfloat16)
    # The decoder really computes in bf16: its products take bf16 operands and return float32
    # (the rest of it, and the logits the filters see, are float32); only layer 0's image side,
    # projected once per crop (`modeling.image_context`), stays float32.
    cfg = tiny.model.config
    emb = jnp.zeros((1, cfg.embedding_size, cfg.embedding_size, cfg.prompt_embed_dim), jnp.float32)
    coords = jnp.zeros((2, 2), jnp.float32)
    eqns = products(lambda e: pipeline.decode_tokens(bf16, tiny.params, e, coords), emb)
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in eqns)
    assert sum(all(v.aval.dtype == jnp.bfloat16 for v in e.invars[:2]) for e in eqns) >= 20

    fp32 = SamAutomaticMaskGenerator(tiny.model, tiny.params, **KEEP_ALL).generate(image)
    half = SamAutomaticMaskGenerator(bf16, tiny.params, **KEEP_ALL).generate(image)
    assert len(half) == len(fp32) == 3 * 64
    by_point = defaultdict(list)
    for r in half:
        by_point[tuple(r["point_coords"][0])].append(r)
    best, d_iou = [], []
    for r in fp32:
        mates = by_point[tuple(r["point_coords"][0])]
        assert len(mates) == 3
        score, mate = max(((_iou(r["segmentation"], m["segmentation"]), m) for m in mates), key=lambda t: t[0])
        best.append(score)
        d_iou.append(abs(mate["predicted_iou"] - r["predicted_iou"]))
    best = np.array(best)
    # bf16 keeps 8 significand bits: pixels whose logits are near 0 (mask borders) flip, the rest
    # do not. Measured on this tiny randomised model: every mask IoU >= 0.97 (median 0.99),
    # predicted IoU within 0.02. The bars leave room for other CPUs while a wrong cast or layout
    # (IoU ~0.5 against masks covering 30-60% of the image) fails them.
    assert (best >= 0.9).mean() >= 0.95, np.percentile(best, [0, 5, 50])
    assert np.median(best) >= 0.95
    assert max(d_iou) < 0.1 and np.median(d_iou) < 0.02
