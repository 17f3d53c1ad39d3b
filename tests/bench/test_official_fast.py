"""The benchmark's fast official configuration (bench/official_fast.py) computes the official
image encoder's function: a speed-up measured against it is one against the same model."""

from __future__ import annotations

import copy

import pytest
import torch

import sam_jax
from bench.official_fast import MODES, OfficialConfig, configure_official, default_mode, use_sdpa
from tests.reference import official_sam, randomise_


@pytest.fixture(scope="module")
def tiny_official():
    return randomise_(official_sam(sam_jax.get_config("tiny")), seed=3)


def _input(model, batch=2):
    s = model.image_encoder.img_size
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(0))


def test_sdpa_forward_matches_official(tiny_official):
    x = _input(tiny_official)
    fast = copy.deepcopy(tiny_official)
    # tiny has windowed and global blocks: both kinds of Attention are switched.
    assert use_sdpa(fast.image_encoder) == len(tiny_official.image_encoder.blocks)
    with torch.no_grad():
        want, got = tiny_official.image_encoder(x), fast.image_encoder(x)
    scale = want.abs().max().item()
    # fp32 on both sides; only the order of the softmax's sums differs (~1e-6 x scale seen).
    assert (got - want).abs().max().item() <= 1e-5 * scale


def test_bf16_encoder_returns_fp32_features(tiny_official):
    x = _input(tiny_official)
    fast = configure_official(
        copy.deepcopy(tiny_official), OfficialConfig(device="cpu", sdpa=True, bf16=True, compile=False)
    )
    with torch.no_grad():
        want, got = tiny_official.image_encoder(x), fast.image_encoder(x)
    assert got.dtype == torch.float32 and got.shape == want.shape
    # bf16 keeps 8 bits of mantissa: the features agree to ~1e-2 relative, not to fp32 rounding.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 5e-2, rel
    assert fast.image_encoder.img_size == tiny_official.image_encoder.img_size  # read by preprocess


def test_modes():
    assert OfficialConfig.from_mode("eager", "cpu") == OfficialConfig("cpu")
    assert OfficialConfig.from_mode("fast", "cuda") == OfficialConfig("cuda", True, True, True)
    assert "torch.compile" in OfficialConfig.from_mode("fast", "cuda").describe()
    assert set(MODES) == {"eager", "fast"}
    assert default_mode("cuda:0") == "fast" and default_mode("cpu") == "eager"
    with pytest.raises(ValueError, match="mode must be one of"):
        OfficialConfig.from_mode("turbo", "cpu")
