"""Unit tests for the porting traps that are easy to isolate (see PORTING.md)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from segment_anything.modeling import image_encoder as official_enc

from sam_jax.checkpoints.official import CONV_TRANSPOSE_MODULES, _to_flax_layout
from sam_jax.modeling.common import SAM_LN_EPS, TORCH_LN_EPS, gelu, layer_norm
from sam_jax.modeling.image_encoder import get_rel_pos, window_partition, window_unpartition

RNG = np.random.RandomState(0)


def test_conv_transpose_layout():
    """ConvTranspose2d(k=2, s=2) weight (in, out, kh, kw): converted kernel reproduces torch."""
    t = torch.nn.ConvTranspose2d(8, 5, kernel_size=2, stride=2)
    x = RNG.randn(2, 7, 9, 8).astype(np.float32)
    with torch.no_grad():
        ref = t(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    w = t.weight.detach().numpy()
    layer = nn.ConvTranspose(5, (2, 2), strides=(2, 2), padding="VALID")
    module = next(iter(CONV_TRANSPOSE_MODULES))

    def run(kernel):
        return np.asarray(layer.apply({"params": {"kernel": kernel, "bias": t.bias.detach().numpy()}}, x))

    got = run(_to_flax_layout(module, "kernel", w))
    assert got.shape == ref.shape == (2, 14, 18, 5)
    # fp32 sums of 8 products: a few ulps.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # The plain (kh, kw, in, out) transpose is the trap: it must NOT pass the same check.
    naive = run(w.transpose(2, 3, 0, 1))
    assert np.abs(naive - ref).max() > 1e-2
    # The mask decoder's matmul form of the same layer, on the same parameters, output in its
    # blocked layout (b, h, w, a, b', C) = pixel (2h + a, 2w + b').
    from sam_jax.modeling.mask_decoder import _ConvTranspose2x2

    blocked = np.asarray(
        _ConvTranspose2x2(8, 5).apply(
            {"params": {"kernel": _to_flax_layout(module, "kernel", w), "bias": t.bias.detach().numpy()}}, x
        )
    )
    assert blocked.shape == (2, 7, 9, 2, 2, 5)
    np.testing.assert_allclose(blocked.transpose(0, 1, 3, 2, 4, 5).reshape(ref.shape), ref, rtol=0, atol=1e-5)
    # Its channels-first forms (narrow decoders), from NHWC and from NCHW input, output NCHW.
    for layout, inp in (("nhwc->nchw", x), ("nchw", x.transpose(0, 3, 1, 2))):
        cf = np.asarray(
            _ConvTranspose2x2(8, 5, layout=layout).apply(
                {"params": {"kernel": _to_flax_layout(module, "kernel", w), "bias": t.bias.detach().numpy()}}, inp
            )
        )
        np.testing.assert_allclose(cf.transpose(0, 2, 3, 1), ref, rtol=0, atol=1e-5)


@pytest.mark.full  # ~35 CPU-s: the whole tiny model initialised and applied unjitted
def test_decoder_upscaling_layouts_agree(monkeypatch):
    """Narrow decoders (C <= CHANNELS_FIRST_MAX_DIM) upscale channels-first, wide ones blocked:
    the two give the same masks on the same params (the torch parity tests cover the tiny config,
    channels-first, and vit_b, blocked)."""
    import jax

    import sam_jax
    from sam_jax.modeling import mask_decoder

    cfg = sam_jax.get_config("tiny")
    model = sam_jax.build_sam(cfg)
    params = sam_jax.init_params(model, jax.random.PRNGKey(0))
    params = jax.tree_util.tree_map(lambda p: p + 0.2 * jnp.asarray(RNG.randn(*p.shape), p.dtype), params)
    g, c = cfg.embedding_size, cfg.prompt_embed_dim
    emb = jnp.asarray(RNG.randn(3, g, g, c).astype(np.float32))
    pts = jnp.asarray(RNG.rand(3, 2, 2).astype(np.float32) * cfg.image_size)
    labels = jnp.asarray([[1, 0], [1, 1], [0, -1]])
    out = {}
    for limit in (c, c - 8):
        monkeypatch.setattr(mask_decoder, "CHANNELS_FIRST_MAX_DIM", limit)
        out[limit] = model.apply({"params": params}, emb, pts, labels, multimask_output=True, method="decode")
    assert out[c][0].shape == (3, 3, 4 * g, 4 * g)
    # float32, the same sums in another order: ~1e-6 of the logits' scale.
    for a, b in zip(out[c], out[c - 8]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("eps", [SAM_LN_EPS, TORCH_LN_EPS])
def test_layer_norm_epsilon_and_variance(eps):
    """Small variance (eps matters) on a large mean (the fast variance formula loses it)."""
    x = (30.0 + 3e-3 * RNG.randn(4, 6, 32)).astype(np.float32)
    w, b = (1 + 0.1 * RNG.randn(32)).astype(np.float32), (0.1 * RNG.randn(32)).astype(np.float32)
    t = torch.nn.LayerNorm(32, eps=eps)
    with torch.no_grad():
        t.weight.copy_(torch.from_numpy(w))
        t.bias.copy_(torch.from_numpy(b))
        ref = t(torch.from_numpy(x)).numpy()
    ln = layer_norm(eps, "ln")
    got = np.asarray(ln.apply({"params": {"scale": w, "bias": b}}, x))
    # Outputs are O(1); the offset of 30 costs ~1e-3 relative precision before centring
    # on both sides. A wrong epsilon (1e-5 vs 1e-6 at variance 9e-6) is off by ~5%.
    np.testing.assert_allclose(got, ref, rtol=0, atol=5e-3)
    other = TORCH_LN_EPS if eps == SAM_LN_EPS else SAM_LN_EPS
    wrong = np.asarray(layer_norm(other, "ln").apply({"params": {"scale": w, "bias": b}}, x))
    assert np.abs(wrong - ref).max() > 2e-2


def test_layer_norm2d_is_channel_layer_norm():
    """The official LayerNorm2d over NCHW channels equals our last-axis norm over NHWC."""
    from segment_anything.modeling.common import LayerNorm2d

    x = RNG.randn(2, 16, 5, 7).astype(np.float32) * 3 + 1
    t = LayerNorm2d(16)
    with torch.no_grad():
        t.weight.copy_(torch.randn(16))
        t.bias.copy_(torch.randn(16))
        ref = t(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    got = layer_norm(SAM_LN_EPS, "ln").apply(
        {"params": {"scale": t.weight.detach().numpy(), "bias": t.bias.detach().numpy()}}, x.transpose(0, 2, 3, 1)
    )
    np.testing.assert_allclose(np.asarray(got), ref, rtol=0, atol=1e-5)  # fp32 rounding of O(1) values


def test_gelu_is_exact_erf():
    x = np.linspace(-6, 6, 10001, dtype=np.float32)
    ref = torch.nn.GELU()(torch.from_numpy(x)).numpy()
    got = np.asarray(gelu(jnp.asarray(x)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)  # fp32 erf rounding
    approx = np.asarray(nn.gelu(jnp.asarray(x)))  # Flax's default, the tanh form
    assert np.abs(approx - ref).max() > 1e-4


@pytest.mark.parametrize("q,k,length", [(14, 14, 27), (10, 10, 19), (10, 10, 27), (12, 12, 9), (6, 9, 17)])
def test_get_rel_pos(q, k, length):
    """Indexing, and linear resampling (no antialias) when the table length differs."""
    table = RNG.randn(length, 8).astype(np.float32)
    ref = official_enc.get_rel_pos(q, k, torch.from_numpy(table)).numpy()
    got = np.asarray(get_rel_pos(q, k, jnp.asarray(table)))
    # Exact when no resampling; else both sides round the linear weights in fp32, but differently
    # (torch: source index then lerp; jax: normalised kernel weights): a few ulps of O(1) values.
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw,window", [((10, 10), 4), ((64, 64), 14), ((14, 14), 14), ((5, 9), 3)])
def test_window_partition_roundtrip(hw, window):
    x = RNG.randn(2, *hw, 3).astype(np.float32)
    ref, ref_pad = official_enc.window_partition(torch.from_numpy(x), window)
    got, pad = window_partition(jnp.asarray(x), window)
    assert pad == ref_pad
    np.testing.assert_array_equal(np.asarray(got), ref.numpy())
    np.testing.assert_array_equal(np.asarray(window_unpartition(got, window, pad, hw)), x)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 6])
def test_chunked_rel_pos_attention_equals_full(chunk_rows):
    """The CPU path (query rows of one head at a time) computes the same attention."""
    from sam_jax.modeling.image_encoder import rel_pos_attention

    b, n, h, w, hd = 2, 3, 12, 10, 8
    q, k, v = (RNG.randn(*s).astype(np.float32) for s in [(b, n, h, w, hd), (b, n, h * w, hd), (b, n, h * w, hd)])
    rel_h, rel_w = RNG.randn(b, n, h, w, h).astype(np.float32), RNG.randn(b, n, h, w, w).astype(np.float32)
    full = np.asarray(rel_pos_attention(q, k, v, rel_h, rel_w))
    got = np.asarray(rel_pos_attention(q, k, v, rel_h, rel_w, chunk_rows))
    np.testing.assert_allclose(got, full, rtol=0, atol=1e-5)  # same math, other matmul blocking
    with pytest.raises(ValueError, match="must divide"):
        rel_pos_attention(q, k, v, rel_h, rel_w, 5)


@pytest.mark.parametrize("plan", ["standard", "few_queries", "few_keys"])
@pytest.mark.parametrize("n_q,n_k", [(7, 300), (300, 7)])
def test_decoder_attention_orders_match_official(plan, n_q, n_k):
    """Every order of products `Attention` may pick equals the official module (random weights
    and biases), and a masked key equals a key that is not there at all."""
    from segment_anything.modeling.transformer import Attention as OfficialAttention

    from sam_jax.modeling.transformer import Attention

    torch.manual_seed(0)
    ref = OfficialAttention(64, 4, downsample_rate=2)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    params = {
        name: {"kernel": getattr(ref, name).weight.detach().numpy().T, "bias": getattr(ref, name).bias.detach().numpy()}
        for name in ("q_proj", "k_proj", "v_proj", "out_proj")
    }
    q, k, v = (RNG.randn(2, n, 64).astype(np.float32) for n in (n_q, n_k, n_k))
    ours = Attention(64, 4, downsample_rate=2, plan=plan)
    valid = np.ones((2, n_k), bool)
    valid[0, n_k // 2 :] = False  # batch 0 sees only the first half of its keys
    with torch.no_grad():
        want = [
            ref(*(torch.from_numpy(x[i : i + 1]) for x in (q, k[:, keep], v[:, keep]))).numpy()
            for i, keep in enumerate([slice(0, n_k // 2), slice(None)])
        ]
    got = np.asarray(ours.apply({"params": params}, q, k, v, valid))
    # fp32 with the sums taken in another order: a few ulps of values of size ~10.
    np.testing.assert_allclose(got, np.concatenate(want), rtol=0, atol=2e-5 * np.abs(want[1]).max())
    with pytest.raises(ValueError, match="plan must be"):
        Attention(64, 4, downsample_rate=2, plan="fast").apply({"params": params}, q, k, v)
