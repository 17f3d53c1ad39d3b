"""MobileSAM's TinyViT image encoder against the reference (`mobile_sam`, PyPI mobilesam-mirror).

The reference MobileSAM has every floating tensor randomised (BatchNorm running statistics
included); its state_dict goes through the real converter (`convert_state_dict`, layout detected
from the keys), and the embeddings of `Sam.encode_image` are compared with the reference's image
encoder. The reference only runs at 1024 x 1024 (its forward reshapes the tokens to a literal
64 x 64 grid) with a 256-wide neck, hence the tiny preset's layout (see config.py). JAX runs at
matmul precision "highest" (conftest), torch on CPU.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import sam_jax
from sam_jax.checkpoints import convert_state_dict
from sam_jax.modeling.tiny_vit import TinyViT, attention_bias_idxs, depthwise_conv
from tests.reference import max_rel_err, official_sam, randomise_, to_nchw

# The embedding (after the neck's LayerNorm2d, std ~1): max abs error <= 1e-4 x std of the
# reference, the bound SAM's image encoder meets (test_parity.EMBED_TOL). Measured: 1.2e-5 (a
# tiny layout) and 1.3e-5 (mobile_sam), fp32 rounding of ~20 convs / matmuls in different orders
# (XLA vs oneDNN), the BatchNorms folded into the kernels here and applied after the conv in the
# reference.
EMBED_TOL = 1e-4


def _parity(name: str, seed: int, batch: int) -> None:
    tm = randomise_(official_sam(sam_jax.get_config(name)), seed)
    cfg, params = convert_state_dict(tm.state_dict())
    assert cfg == sam_jax.get_config(name)
    x = np.random.default_rng(seed).standard_normal((batch, 1024, 1024, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tm.image_encoder(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    model = sam_jax.build_sam(cfg)
    got = np.asarray(jax.jit(model.apply, static_argnames="method")({"params": params}, x, method="encode_image"))
    assert got.shape == (batch, 64, 64, 256)
    err = max_rel_err(got, ref)
    assert err <= EMBED_TOL, err


@pytest.mark.full  # ~5 s of compiling; the daily tier keeps the depthwise conv and bias table checks
def test_tiny_parity():
    _parity("tiny_mobile_sam", seed=0, batch=1)


# ~20 s on 2 cores shared with another job (load ~3), mostly the reference's forward of a batch
# of 2 and XLA's compile.
@pytest.mark.full
def test_mobile_sam_parity():
    _parity("mobile_sam", seed=1, batch=2)


@pytest.mark.parametrize("h, w", [(7, 7), (14, 14), (5, 3)])
def test_attention_bias_idxs_match_reference(h, w):
    from mobile_sam.modeling.tiny_vit_sam import Attention

    ref = Attention(16, 8, num_heads=2, attn_ratio=1, resolution=(h, w)).attention_bias_idxs.numpy()
    np.testing.assert_array_equal(attention_bias_idxs(h, w), ref)


@pytest.mark.parametrize("k, stride, hw", [(3, 1, (9, 13)), (3, 2, (9, 13)), (3, 2, (8, 8)), (5, 1, (7, 6))])
def test_depthwise_conv_matches_torch(k, stride, hw):
    rng = np.random.default_rng(k * 10 + stride)
    x = rng.standard_normal((2, *hw, 6)).astype(np.float32)
    kernel = rng.standard_normal((k, k, 1, 6)).astype(np.float32)
    conv = torch.nn.Conv2d(6, 6, k, stride, k // 2, groups=6, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
        ref = conv(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(depthwise_conv(x, kernel, stride))
    assert got.shape == ref.shape
    # Nine (25) products summed in another order: a few float32 ulps of |y| ~ 3.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


def test_rejects_a_layout_that_does_not_reduce_16x():
    bad = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 0))  # last merge with stride 2: 32x
    with pytest.raises(ValueError, match="reduce the image 16x"):
        TinyViT(**bad).init(jax.random.PRNGKey(0), np.zeros((1, 1024, 1024, 3), np.float32))
