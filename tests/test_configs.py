"""Every preset builds and has exactly the official parameter count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sam_jax
from tests.reference import official_sam

# Values in the official state_dict (parameters plus the saved gaussian PE buffer; for MobileSAM
# also the BatchNorm statistics), less what is not a parameter here (NOT_PARAMETERS).
PINNED_COUNTS = {
    "vit_b": 93_735_728,
    "vit_l": 312_343_088,
    "vit_h": 641_090_864,
    "default": 641_090_864,
    "tiny": 227_604,
    "mobile_sam": 9_818_564,
    "vit_t": 9_818_564,
    "tiny_mobile_sam": 3_918_574,
    "sam_hq_vit_b": 94_806_832,
    "sam_hq_vit_l": 313_676_336,
    "sam_hq_vit_h": 642_686_256,
    "tiny_hq": 247_140,
}
PINNED_TENSORS = {
    "vit_b": 314,
    "vit_l": 482,
    "vit_h": 594,
    "default": 594,
    "tiny": 188,
    "mobile_sam": 408,
    "vit_t": 408,
    "tiny_mobile_sam": 267,
    "sam_hq_vit_b": 339,
    "sam_hq_vit_l": 507,
    "sam_hq_vit_h": 619,
    "tiny_hq": 213,
}
# MobileSAM's state_dict beside its parameters: 31 BatchNorm counters and the unused classifier
# (LayerNorm and Linear(320, 1000)): 439 tensors, 10,140,231 values for mobile_sam.
NOT_PARAMETERS = ("image_encoder.head.", "image_encoder.norm_head.")


def test_every_preset_is_pinned():
    assert set(sam_jax.PRESETS) == set(PINNED_COUNTS) == set(PINNED_TENSORS)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_count(name):
    shapes = sam_jax.param_shapes(sam_jax.build_sam(name))
    assert sam_jax.count_params(shapes) == PINNED_COUNTS[name]
    assert len(sam_jax.checkpoints.flatten_params(shapes)) == PINNED_TENSORS[name]
    cfg = sam_jax.get_config(name)
    # Shapes only, nothing allocated; MobileSAM's TinyViT cannot be built on the meta device (its
    # init reads numbers off tensors), and is small.
    with torch.device("meta" if cfg.encoder_type == "vit" else "cpu"):
        official = official_sam(cfg).state_dict()
    official = {
        k: t for k, t in official.items() if not k.startswith(NOT_PARAMETERS) and not k.endswith("num_batches_tracked")
    }
    assert sum(t.numel() for t in official.values()) == PINNED_COUNTS[name]
    assert len(official) == PINNED_TENSORS[name]


def test_aliases():
    assert sam_jax.get_config("default") == sam_jax.get_config("vit_h")
    assert sam_jax.get_config("vit_t") == sam_jax.get_config("mobile_sam")  # MobileSAM's registry name
    assert sam_jax.config.preset_name(sam_jax.get_config("vit_t")) == "mobile_sam"


def test_a_layout_that_does_not_reduce_16x_is_rejected_when_built():
    cfg = sam_jax.SamConfig(encoder_type="tiny_vit", tiny_vit_embed_dims=(64, 128, 160, 240))  # last merge halves
    with pytest.raises(ValueError, match="TinyViT must reduce the image 16x"):
        sam_jax.param_shapes(sam_jax.build_sam(cfg))


@pytest.mark.parametrize(
    "bad",
    [
        dict(image_size=1000),
        dict(encoder_num_heads=7),
        dict(encoder_global_attn_indexes=(40,)),
        dict(encoder_depth=0, encoder_global_attn_indexes=()),
    ],
)
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError, match="invalid SamConfig"):
        sam_jax.SamConfig(**bad)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model type 'vit_x'"):
        sam_jax.build_sam("vit_x")
    with pytest.raises(TypeError, match="config must be"):
        sam_jax.build_sam(3)


INDEXES = "encoder_global_attn_indexes"


@pytest.mark.parametrize(
    "bad,needle",
    [
        (dict(patch_size=0), "patch_size must be a positive integer, got 0"),  # was a ZeroDivisionError
        (dict(encoder_embed_dim=-1280), "encoder_embed_dim must be a positive integer, got -1280"),
        (dict(encoder_depth=32.0), "encoder_depth must be a positive integer, got 32.0"),
        (dict(decoder_num_heads=True), "decoder_num_heads must be a positive integer, got True"),
        (dict(image_size="1024"), "image_size must be a positive integer, got '1024'"),
        (dict(mlp_ratio=float("nan")), "mlp_ratio must be a positive number, got nan"),
        (dict(mlp_ratio=1e-9), "encoder_embed_dim * mlp_ratio (the ViT MLP width) must be at least 1"),
        (dict(encoder_global_attn_indexes="7"), f"{INDEXES} must be a list of block indexes, got '7'"),
        (dict(encoder_global_attn_indexes=[7.0]), f"{INDEXES} must be a list of block indexes, got [7.0]"),
        (dict(encoder_type="tinyvit"), "encoder_type must be one of ('vit', 'tiny_vit'), got 'tinyvit'"),
        (dict(hq=1), "hq must be True or False, got 1"),
        (dict(hq=True, encoder_type="tiny_vit"), "hq (SAM-HQ) needs a 'vit' encoder with a global-attention block"),
        (
            dict(hq=True, encoder_global_attn_indexes=()),
            "hq (SAM-HQ) needs a 'vit' encoder with a global-attention block",
        ),
        (
            dict(tiny_vit_depths=(2, -1)),
            "tiny_vit_depths must be a non-empty list of block counts (0 or more), got (2, -1)",
        ),
        (dict(tiny_vit_num_heads=()), "tiny_vit_num_heads must be a non-empty list of positive integers, got ()"),
        (
            dict(encoder_type="tiny_vit", patch_size=8),
            "a tiny_vit encoder reduces the image 16x: patch_size must be 16, got 8",
        ),
        (
            dict(encoder_type="tiny_vit", tiny_vit_depths=(1, 1, 1)),
            "tiny_vit_embed_dims, _depths, _num_heads and _window_sizes need one entry per stage",
        ),
        (
            dict(encoder_type="tiny_vit", tiny_vit_num_heads=(2, 4, 6, 10)),
            "each tiny_vit_embed_dims entry (after stage 0) must be divisible by its tiny_vit_num_heads",
        ),
    ],
)
def test_each_field_is_checked_by_type_and_sign(bad, needle):
    with pytest.raises(ValueError) as e:
        sam_jax.SamConfig(**bad)
    assert str(e.value) == f"invalid SamConfig: {needle}"


def test_numpy_numbers_are_stored_as_python_numbers():
    indexes = range(7, 32, 8)
    cfg = sam_jax.SamConfig(encoder_depth=np.int64(32), mlp_ratio=np.float32(4), encoder_global_attn_indexes=indexes)
    assert cfg == sam_jax.get_config("vit_h") and type(cfg.encoder_depth) is int and type(cfg.mlp_ratio) is float
    assert cfg.encoder_global_attn_indexes == (7, 15, 23, 31) and json.loads(cfg.to_json()) == cfg.to_dict()


def test_config_json_roundtrip():
    for cfg in sam_jax.PRESETS.values():
        assert sam_jax.SamConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="^a SamConfig is a mapping of its fields, got list$"):
        sam_jax.SamConfig.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"^unknown SamConfig fields: \['1', 'colour'\]$"):
        sam_jax.SamConfig.from_dict({"colour": 3, 1: 2})
