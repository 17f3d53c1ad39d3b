"""SAM-HQ checkpoints (`sam_hq_vit_b/l/h.pth`: SAM's keys plus the HQ decoder's) through the real
converter and back: SAM-HQ detected from the keys, every tensor carried (the HQ ConvTranspose
weights in the flipped layout, as SAM's own), and an exported `.pth` that SAM-HQ's own loader takes.
The numeric parity of the converted model is in tests/modeling/test_hq.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sam_jax
from sam_jax.checkpoints import ConversionError, convert_state_dict, export_pth, export_state_dict, flatten_params
from sam_jax.checkpoints.official import HQ_PREFIXES, plan_conversion
from tests.reference import official_sam, randomise_


def test_detected_and_round_trip():
    sd = randomise_(official_sam(sam_jax.get_config("tiny_hq")), seed=3).state_dict()
    cfg, params = convert_state_dict(sd)
    assert cfg == sam_jax.get_config("tiny_hq")
    assert "mask_decoder/compress_vit_feat_0/kernel" in flatten_params(params)
    back = export_state_dict(params)
    assert set(back) == set(sd)
    for k, v in sd.items():
        assert np.array_equal(back[k], v.numpy()), k  # bitwise: layouts (ConvT flips) undone exactly


def test_sam_is_not_sam_hq():
    sd = randomise_(official_sam(sam_jax.get_config("tiny_hq")), seed=3).state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    with pytest.raises(
        ConversionError, match="model type tiny does not match the checkpoint, which looks like tiny_hq"
    ):
        plan_conversion(shapes, "tiny")
    sam_only = {k: v for k, v in shapes.items() if not k.startswith("mask_decoder.")} | {
        k: v for k, v in shapes.items() if k.startswith("mask_decoder.") and "hf_" not in k
    }
    # Some of SAM-HQ's parts but not its token and its MLP: SAM-HQ lacking those 7 keys (any of
    # SAM-HQ's additions makes a checkpoint SAM-HQ's), not SAM with 18 stray keys.
    for forced in ("tiny_hq", "auto"):
        with pytest.raises(ConversionError, match=r"^the checkpoint does not fit tiny_hq \(SAM-HQ, .*: 7 missing keys"):
            plan_conversion(sam_only, forced)
    # SAM's keys alone are SAM's.
    sam = {k: v for k, v in sam_only.items() if not k.startswith(HQ_PREFIXES)}
    assert plan_conversion(sam)[0] == sam_jax.get_config("tiny")


@pytest.mark.full  # ~10 CPU-s: a randomised vit_b-sized model, saved and loaded twice
def test_exported_pth_loads_into_sam_hq(tmp_path):
    """`export_pth` writes what `segment_anything_hq.sam_model_registry["vit_b"]` loads (strictly)."""
    from segment_anything_hq import sam_model_registry

    sd = randomise_(official_sam(sam_jax.get_config("sam_hq_vit_b")), seed=4).state_dict()
    cfg, params = convert_state_dict(sd)
    assert cfg == sam_jax.get_config("sam_hq_vit_b")
    out = tmp_path / "sam_hq_vit_b.pth"
    export_pth(params, out)
    got = sam_model_registry["vit_b"](checkpoint=str(out)).state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
