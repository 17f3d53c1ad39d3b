"""The automatic mask generator's mask set per precision mode against the official fp32 generator.

Randomised vit_b (conftest `vit_b`), coffee, test_parity's "coffee/crop0" settings (16 x 16
points, its loose thresholds, under which tens of masks survive on random weights). Modes: "bf16"
(`model.clone(dtype=bfloat16)`), "w8" and "w8a8" (`sam_jax.quantize`), and our fp32 model as the
control row (test_parity holds it to the strict criteria; here it passes the same floors).

A precision mode moves the logits a little, so a mask whose predicted IoU or stability is near
its threshold may enter or leave the set: equal sets are not expected. Figures per mode:
  * counts: official / ours;
  * `official matched` / `ours matched`: share of the official masks with a counterpart in ours
    (same generating point and crop box, the best mask IoU of that point's masks) at mask IoU
    >= MATCH_IOU, and the symmetric share of ours matched in the official set;
  * `mean IoU` / `min IoU`: of the best pairs (official mask and its best same-point mask in ours)
    over all official masks that have a same-point mask in ours;
  * `max d iou` / `max d stab`: the largest |predicted_iou| and |stability_score| difference of
    the matched pairs.

Measured 2026-12-05 (randomised vit_b, seed 1; XLA:CPU; figures print with `-s`):

  mode  official  ours  official matched  ours matched  mean IoU  min IoU  max d iou  max d stab  unmatched
  fp32        49    49    1.000             1.000         1.0000    1.0000    1.6e-06     4.2e-06   0
  bf16        49    51    0.959 (47/49)     0.922 (47/51) 0.9987    0.9970    0.0081      0.0084    6 (margin <= 0.0058)
  w8          49    49    1.000             1.000         0.9988    0.9979    0.0037      0.0043    0
  w8a8        49    50    1.000             0.980 (49/50) 0.9980    0.9967    0.0060      0.0052    1 (margin 0.0033)

Every mask without a counterpart (either side) has a predicted IoU or stability within 0.006 of
its threshold (0.05 / 0.3), less than the score changes of the matched pairs: the churn is at the
thresholds, as expected, and the floors check that it stays there (`unmatched max margin`).

Random weights give masks covering ~95% of the photo (areas ~230,000 of 240,000 pixels): any two
of them overlap at IoU >= ~0.9 by their areas alone, so the mask IoU figures here are high and say
less than the predictor's (mean mask IoU 0.9962 bf16, 0.9960 w8, 0.9932 w8a8 against the official
fp32 predictor on four photos and four prompt kinds: tests/modeling/test_bf16.py,
tests/test_quantize.py). The telling figures are the score differences and where the churn
happens. Floors: the worst measured mode with a margin for another XLA / qwix version, each with
its reason beside it; the fp32 control passes them trivially.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sam_jax.amg import rle_to_mask
from sam_jax.quantize import quantize
from tests.amg.test_parity import FULL_SIZE_CASES, PHOTOS, _official, _ours
from tests.fidelity import figure_report, mask_iou

FIGURES, _print_figures = figure_report()

CASE = "coffee/crop0"  # coffee, 16 x 16 points, FULL_SIZE_LOOSE thresholds
MATCH_IOU = 0.9  # a counterpart: the same point's mask, overlapping at least this much
MODES = ("fp32", "bf16", "w8", "w8a8")

# Share of masks with a counterpart, each direction: measured 0.959 / 0.922 at worst (bf16: 2 of 49
# official masks left the set, 4 of 51 entered); 0.85 leaves room for ~3 more of ~50 to churn.
MIN_MATCHED = 0.85
# Mean / min IoU of the best pairs: measured 0.9980 / 0.9967 at worst (w8a8). 0.995 is the issue's
# predictor bar for bf16 and w8 (masks this large agree more than the predictor's, see above); any
# pair of masks here scores >= ~0.9 by their areas alone.
MEAN_IOU = 0.995
MIN_IOU = 0.99
# |predicted_iou| and |stability_score| differences of matched pairs: measured 0.0084 at worst
# (bf16: 8 significand bits, ~4e-3 relative per rounding, through the decoder's heads); 0.03 is
# ~3.5x that.
MAX_SCORE_DIFF = 0.03


def _model(ref, mode: str):
    """(model, params) of `mode` for the Reference `ref` (fp32: its own)."""
    if mode == "fp32":
        return ref.model, ref.params
    if mode == "bf16":
        return ref.model.clone(dtype=jnp.bfloat16), ref.params
    return quantize(ref.model, ref.params, mode)


def _by_key(records: List[dict]) -> Dict[Tuple, List[int]]:
    keys: Dict[Tuple, List[int]] = {}
    for j, r in enumerate(records):
        keys.setdefault((tuple(r["point_coords"][0]), tuple(r["crop_box"])), []).append(j)
    return keys


def _best(
    records: List[dict], masks: List[np.ndarray], others: List[dict], other_masks: List[np.ndarray]
) -> List[Tuple[int, int, float]]:
    """[(i, j, mask IoU)]: per record i with a same-key record in `others`, the one (j) whose mask
    overlaps its mask best."""
    keys = _by_key(others)
    pairs = []
    for i, r in enumerate(records):
        cands = keys.get((tuple(r["point_coords"][0]), tuple(r["crop_box"])), [])
        if cands:
            ious = [mask_iou(masks[i], other_masks[j]) for j in cands]
            k = int(np.argmax(ious))
            pairs.append((i, cands[k], ious[k]))
    return pairs


def _margin(record: dict, kw: dict) -> float:
    """How near `record` is to the generator's thresholds: the smaller distance of its predicted IoU
    and stability score to theirs."""
    return min(
        abs(record["predicted_iou"] - kw["pred_iou_thresh"]),
        abs(record["stability_score"] - kw["stability_score_thresh"]),
    )


def agreement(official: List[dict], ours: List[dict], kw: dict) -> Dict[str, float]:
    """The module docstring's figures of `ours` against `official` (uncompressed RLE records of a
    generator run with the settings `kw`)."""
    om = [rle_to_mask(r["segmentation"]) for r in official]
    qm = [rle_to_mask(r["segmentation"]) for r in ours]
    forward = _best(official, om, ours, qm)
    backward = _best(ours, qm, official, om)
    matched = [(i, j) for i, j, iou in forward if iou >= MATCH_IOU]
    unmatched = [official[i] for i in set(range(len(official))) - {i for i, _ in matched}]
    unmatched += [ours[j] for j in set(range(len(ours))) - {j for j, _, iou in backward if iou >= MATCH_IOU}]
    ious = np.array([iou for _, _, iou in forward]) if forward else np.zeros(1)

    def max_diff(key: str) -> float:
        return max((abs(official[i][key] - ours[j][key]) for i, j in matched), default=float("nan"))

    return {
        "official": len(official),
        "ours": len(ours),
        "official matched": len(matched) / max(len(official), 1),
        "ours matched": sum(iou >= MATCH_IOU for *_, iou in backward) / max(len(ours), 1),
        "mean IoU": float(ious.mean()),
        "min IoU": float(ious.min()),
        "max d iou": max_diff("predicted_iou"),
        "max d stab": max_diff("stability_score"),
        "unmatched": len(unmatched),
        "unmatched max margin": max((_margin(r, kw) for r in unmatched), default=0.0),
    }


@pytest.fixture(scope="module")
def official(vit_b) -> List[dict]:
    photo, kw = FULL_SIZE_CASES[CASE]
    with torch.no_grad():
        return _official(vit_b.torch_model, **kw).generate(PHOTOS[photo]())


@pytest.mark.full
@pytest.mark.parametrize("mode", MODES)
def test_mask_set_agrees_with_official_fp32(vit_b, official, mode):
    photo, kw = FULL_SIZE_CASES[CASE]
    model, params = _model(vit_b, mode)
    ours = _ours(dataclasses.replace(vit_b, model=model, params=params), **kw).generate(PHOTOS[photo]())
    fig = agreement(official, ours, kw)
    FIGURES[f"vit_b {CASE} {mode} vs official fp32"] = fig
    assert len(official) >= 20, fig  # the thresholds leave tens of masks to compare
    assert fig["official matched"] >= MIN_MATCHED and fig["ours matched"] >= MIN_MATCHED, fig
    assert fig["mean IoU"] >= MEAN_IOU and fig["min IoU"] >= MIN_IOU, fig
    assert fig["max d iou"] <= MAX_SCORE_DIFF and fig["max d stab"] <= MAX_SCORE_DIFF, fig
    # A mask can only leave or enter the set if its scores were within such a change of a threshold.
    assert fig["unmatched max margin"] <= MAX_SCORE_DIFF, fig
