"""MobileSAM's TinyViT image encoder against the reference (`mobile_sam`, PyPI mobilesam-mirror).

The reference model has every floating tensor randomised (BatchNorm running statistics included)
and its state_dict goes through `tests.reference.tiny_vit.tiny_vit_params`, the mechanical name
rule the converter will use. The reference only runs at 1024 x 1024 (its forward reshapes the
tokens to a literal 64 x 64 grid) and keeps the last grid only for a final width of 320 / 448 /
576, so the tiny config is the real layout at 1024 with narrow stages. JAX runs at matmul
precision "highest" (conftest), torch on CPU.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

from sam_jax.modeling.tiny_vit import TinyViT, attention_bias_idxs, depthwise_conv
from tests.reference import max_rel_err, to_nchw
from tests.reference.tiny_vit import UNUSED_PREFIXES, VIT_T, official_tiny_vit, randomise_tiny_vit_, tiny_vit_params

# Narrow stages, the last width 320 (see above); one MBConv block (stage 0), one TinyViT block in each of
# stages 1 and 2, with windows that pad their grids differently (128 -> 132, 64 -> 72) and several
# heads; mlp / expand ratios off their defaults. All three merges and the neck run; stage 3's
# blocks (TinyViT blocks again, 320 wide) only in the full test: each block costs ~0.4 s of compile.
TINY = dict(
    img_size=1024,
    embed_dims=(8, 16, 24, 320),
    depths=(1, 1, 1, 0),
    num_heads=(1, 2, 3, 5),
    window_sizes=(7, 6, 9, 7),
    mlp_ratio=2.0,
    mbconv_expand_ratio=3.0,
    local_conv_size=3,
)

# The embedding (after the neck's LayerNorm2d, std ~1): max abs error <= 1e-4 x std of the
# reference, the bound SAM's image encoder meets (test_parity.EMBED_TOL). Measured: 1.2e-5 (tiny)
# and 1.3e-5 (vit_t), fp32 rounding of ~20 convs / matmuls in different orders (XLA vs oneDNN),
# the BatchNorms folded into the kernels here and applied after the conv in the reference.
EMBED_TOL = 1e-4


def _parity(cfg: dict, seed: int, batch: int) -> None:
    tm = randomise_tiny_vit_(official_tiny_vit(**cfg), seed)
    model = TinyViT(**cfg)
    x = np.random.default_rng(seed).standard_normal((batch, 1024, 1024, 3)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x[:1])["params"]
    sd = tm.state_dict()
    params = tiny_vit_params(sd, shapes)
    used = sum(t.numel() for k, t in sd.items() if t.is_floating_point() and not k.startswith(UNUSED_PREFIXES))
    assert sum(p.size for p in jax.tree_util.tree_leaves(params)) == used
    with torch.no_grad():
        ref = tm(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(jax.jit(model.apply)({"params": params}, x))
    assert got.shape == (batch, 64, 64, 256)
    err = max_rel_err(got, ref)
    assert err <= EMBED_TOL, err


@pytest.mark.full  # ~5 s of compiling; the daily tier keeps the depthwise conv and bias table checks
def test_tiny_parity():
    _parity(TINY, seed=0, batch=1)


# ~20 s on 2 cores shared with another job (load ~3), mostly the reference's forward of a batch
# of 2 and XLA's compile. The tiny test takes ~5 s there, mostly compiling.
@pytest.mark.full
def test_vit_t_parity():
    _parity(VIT_T, seed=1, batch=2)


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


def test_params_mapping_is_strict():
    tm = official_tiny_vit(**TINY)
    shapes = jax.eval_shape(TinyViT(**TINY).init, jax.random.PRNGKey(0), np.zeros((1, 1024, 1024, 3), np.float32))
    sd = dict(tm.state_dict())
    sd["layers.9.blocks.0.mlp.fc1.weight"] = sd.pop("layers.1.blocks.0.mlp.fc1.weight")
    with pytest.raises(ValueError) as e:
        tiny_vit_params(sd, shapes["params"])
    assert "layers.9.blocks.0.mlp.fc1.weight: no parameter layers_9/blocks_0/mlp/fc1/kernel" in str(e.value)
    assert "layers_1/blocks_0/mlp/fc1/kernel: not filled" in str(e.value)


def test_rejects_a_layout_that_does_not_reduce_16x():
    bad = dict(TINY, embed_dims=(8, 16, 24, 32))  # last merge with stride 2: 32x
    with pytest.raises(ValueError, match="reduce the image 16x"):
        TinyViT(**bad).init(jax.random.PRNGKey(0), np.zeros((1, 1024, 1024, 3), np.float32))
