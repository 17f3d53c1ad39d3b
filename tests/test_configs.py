"""Every preset builds and has exactly the official parameter count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import sam_jax
from tests.reference import official_sam

# Values in the official state_dict (parameters plus the saved gaussian PE buffer).
PINNED_COUNTS = {
    "vit_b": 93_735_728,
    "vit_l": 312_343_088,
    "vit_h": 641_090_864,
    "default": 641_090_864,
    "tiny": 227_604,
}
PINNED_TENSORS = {"vit_b": 314, "vit_l": 482, "vit_h": 594, "default": 594, "tiny": 188}


def test_every_preset_is_pinned():
    assert set(sam_jax.PRESETS) == set(PINNED_COUNTS) == set(PINNED_TENSORS)


@pytest.mark.parametrize("name", sorted(PINNED_COUNTS))
def test_param_count(name):
    shapes = sam_jax.param_shapes(sam_jax.build_sam(name))
    assert sam_jax.count_params(shapes) == PINNED_COUNTS[name]
    assert len(sam_jax.checkpoints.flatten_params(shapes)) == PINNED_TENSORS[name]
    with torch.device("meta"):  # shapes only, nothing allocated
        official = official_sam(sam_jax.get_config(name)).state_dict()
    assert sum(t.numel() for t in official.values()) == PINNED_COUNTS[name]
    assert len(official) == PINNED_TENSORS[name]


def test_default_is_vit_h():
    assert sam_jax.get_config("default") == sam_jax.get_config("vit_h")


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
