"""MobileSAM checkpoints (`mobile_sam.pt`: the official SAM key layout with MobileSAM's TinyViT under
`image_encoder.`) through the real converter and back: detection from the keys and shapes, every
tensor carried (BatchNorm statistics included), the same strictness as for SAM, and an exported
`.pth` that MobileSAM's own loader takes. No JAX compile here: the numeric parity of the converted
model is in tests/modeling/test_tiny_vit.py and the predictor / AMG parity tests (full tier)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sam_jax
from sam_jax.checkpoints import ConversionError, convert_state_dict, export_hf, export_pth, flatten_params
from sam_jax.checkpoints.official import plan_conversion, torch_key
from tests.reference import official_sam, randomise_

CLASSIFIER = ("image_encoder.head.", "image_encoder.norm_head.")


@pytest.fixture(scope="module")
def reference():
    """name -> the randomised reference MobileSAM's state_dict (~1 s for mobile_sam)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = randomise_(official_sam(sam_jax.get_config(name)), seed=7).state_dict()
        return dict(cache[name])

    return get


def _parameters(sd):
    return {k: v for k, v in sd.items() if not k.startswith(CLASSIFIER) and not k.endswith("num_batches_tracked")}


@pytest.mark.parametrize("name", ["tiny_mobile_sam", "mobile_sam"])
def test_detected_and_every_tensor_carried(reference, name):
    sd = reference(name)
    cfg, params = convert_state_dict(sd)
    assert cfg == sam_jax.get_config(name)
    flat = flatten_params(params)
    want = _parameters(sd)
    assert len(flat) == len(want)
    assert "image_encoder/layers_0/blocks_0/conv2/bn/running_var" in flat  # statistics are params here
    for fkey, value in flat.items():
        ref = want[torch_key(fkey)].numpy()
        # Layouts differ (kernels transposed); the values are the same numbers.
        assert np.array_equal(np.sort(value.ravel()), np.sort(ref.ravel())), fkey


def test_exported_pth_loads_into_mobile_sam(reference, tmp_path):
    """`export_pth` writes what MobileSAM's `sam_model_registry["vit_t"]` loads strictly: every
    parameter bitwise, the BatchNorm counters (int64) and the classifier the segmentation forward
    never calls (identity LayerNorm, zero Linear) beside them."""
    from mobile_sam import sam_model_registry

    sd = reference("mobile_sam")
    _, params = convert_state_dict(sd)
    out = tmp_path / "mobile_sam.pth"
    export_pth(params, out)
    tm = sam_model_registry["vit_t"](checkpoint=str(out))  # load_state_dict(strict=True)
    got = tm.state_dict()
    assert set(got) == set(sd)
    for k, v in _parameters(sd).items():
        assert torch.equal(got[k], v), k
    assert got["image_encoder.layers.0.blocks.0.conv1.bn.num_batches_tracked"].dtype == torch.int64
    assert torch.equal(got["image_encoder.norm_head.weight"], torch.ones(320))
    assert not got["image_encoder.head.weight"].any()
    # And back: the exported file converts to the same parameters.
    cfg, again = convert_state_dict(torch.load(out, weights_only=True))
    assert cfg == sam_jax.get_config("mobile_sam")
    for k, v in flatten_params(params).items():
        assert np.array_equal(flatten_params(again)[k], v), k


def test_the_unused_tensors_are_optional(reference):
    sd = _parameters(reference("tiny_mobile_sam"))  # no counters, no classifier
    cfg, _ = convert_state_dict(sd)
    assert cfg == sam_jax.get_config("tiny_mobile_sam")


def test_strictness(reference):
    sd = reference("tiny_mobile_sam")
    sd["image_encoder.layers.1.blocks.0.attn.stray"] = torch.zeros(3)
    del sd["image_encoder.layers.2.blocks.0.local_conv.bn.running_var"]
    sd["image_encoder.layers.1.blocks.0.attn.qkv.bias"] = torch.zeros(47)
    with pytest.raises(ConversionError) as e:
        convert_state_dict(sd)
    text, problems = str(e.value), e.value.problems
    assert text.startswith("the checkpoint does not fit tiny_mobile_sam (TinyViT, stage widths [8, 16, 24, 320]")
    assert "1 missing key, 1 wrong shape, 1 unexpected key" in text
    assert "missing key image_encoder.layers.2.blocks.0.local_conv.bn.running_var (24,)" in problems
    assert "unexpected key image_encoder.layers.1.blocks.0.attn.stray (3,)" in problems
    assert "image_encoder.layers.1.blocks.0.attn.qkv.bias: shape (47,), expected (48,)" in problems


def test_model_type_is_checked_against_the_keys(reference):
    shapes = {k: tuple(v.shape) for k, v in reference("mobile_sam").items()}
    assert plan_conversion(shapes, "vit_t")[0] == sam_jax.get_config("mobile_sam")
    with pytest.raises(
        ConversionError, match=r"model type vit_b does not match the checkpoint, which looks like mobile_sam"
    ):
        plan_conversion(shapes, "vit_b")


def test_no_hugging_face_layout(reference, tmp_path):
    _, params = convert_state_dict(reference("tiny_mobile_sam"))
    with pytest.raises(ConversionError, match="has SAM's ViT encoder only, not tiny_mobile_sam"):
        export_hf(params, "tiny_mobile_sam", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
