"""The mask decoder restructured for the automatic mask generator's prompts.

Every AMG prompt is ONE foreground point against ONE shared image embedding, with no box and no
mask input. `Sam.decode` computes the same function but treats each prompt's copy of the 4096
image tokens independently. Here, with the same parameters and the same math:
  * layer 0's image side is prompt-independent (keys = embedding + no-mask embedding): its
    key / value / query projections are computed once, not once per prompt;
  * attention between the T = 7 tokens and the N image tokens is reassociated so the per-prompt
    work is O(N * T * C) instead of O(N * C * C/2) projections: the token->image scores are
    (q W_k^T) . X^T and the values (softmax . X) W_v (rows of the softmax sum to 1); the
    image->token scores are X . (W_q k^T) and the output softmax . (v W_out);
  * the two stride-2, kernel-2 transposed convolutions of the output upscaling are plain
    matmuls (no overlap between taps), kept in a blocked layout until the final mask product.
About 2x fewer FLOPs per prompt; equal to `Sam.decode` up to float32 rounding (tested in
tests/test_amg_ops.py). Layouts: NHWC embeddings, coordinates in the model-input frame.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from ..modeling import Sam
from ..modeling.common import SAM_LN_EPS, TORCH_LN_EPS, gelu, layer_norm

Tree = Dict[str, Any]


def _ln(p: Tree, x: jax.Array, eps: float) -> jax.Array:
    return layer_norm(eps, "ln").apply({"params": p}, x)


def _dense(p: Tree, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def _mlp(p: Tree, x: jax.Array, depth: int) -> jax.Array:
    for i in range(depth):
        x = _dense(p[f"layers_{i}"], x)
        if i < depth - 1:
            x = jax.nn.relu(x)
    return x


def _heads(p: Tree, n_heads: int) -> Tuple[jax.Array, jax.Array]:
    """A projection's kernel (C, I) and bias (I,) split per head: (C, H, d), (H, d)."""
    k, b = p["kernel"], p["bias"]
    return k.reshape(k.shape[0], n_heads, -1), b.reshape(n_heads, -1)


def _attention(p: Tree, q: jax.Array, k: jax.Array, v: jax.Array, n_heads: int) -> jax.Array:
    """Plain attention among tokens: (B, T, C) each -> (B, T, C)."""
    qh = _dense(p["q_proj"], q).reshape(*q.shape[:2], n_heads, -1)
    kh = _dense(p["k_proj"], k).reshape(*k.shape[:2], n_heads, -1)
    vh = _dense(p["v_proj"], v).reshape(*v.shape[:2], n_heads, -1)
    s = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / jnp.sqrt(jnp.float32(qh.shape[-1]))
    out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), vh)
    return _dense(p["out_proj"], out.reshape(*q.shape[:2], -1))


def _token_to_image(p: Tree, q: jax.Array, k_in: jax.Array, v_in: jax.Array, n_heads: int) -> jax.Array:
    """Tokens (B, T, C) attend to image tokens k_in, v_in ((B or 1), N, C) -> (B, T, C), with the
    image-side projections folded into the tokens (see the module docstring)."""
    wk, bk = _heads(p["k_proj"], n_heads)
    wv, bv = _heads(p["v_proj"], n_heads)
    qh = _dense(p["q_proj"], q).reshape(*q.shape[:2], n_heads, -1)  # (B, T, H, d)
    scale = jnp.sqrt(jnp.float32(qh.shape[-1]))
    if k_in.shape[0] == 1:  # shared image side: project once
        kh = jnp.einsum("nc,chd->nhd", k_in[0], wk) + bk
        vh = jnp.einsum("nc,chd->nhd", v_in[0], wv) + bv
        s = jnp.einsum("bthd,nhd->bhtn", qh, kh) / scale
        out = jnp.einsum("bhtn,nhd->bthd", jax.nn.softmax(s, axis=-1), vh)
    else:
        qk = jnp.einsum("bthd,chd->bhtc", qh, wk)
        s = (jnp.einsum("bhtc,bnc->bhtn", qk, k_in) + jnp.einsum("bthd,hd->bht", qh, bk)[..., None]) / scale
        pooled = jnp.einsum("bhtn,bnc->bhtc", jax.nn.softmax(s, axis=-1), v_in)
        out = jnp.einsum("bhtc,chd->bthd", pooled, wv) + bv
    return _dense(p["out_proj"], out.reshape(*q.shape[:2], -1))


def _image_to_token(p: Tree, q_in: jax.Array, k: jax.Array, v: jax.Array, n_heads: int) -> jax.Array:
    """Image tokens q_in ((B or 1), N, C) attend to tokens k, v (B, T, C) -> (B, N, C)."""
    wq, bq = _heads(p["q_proj"], n_heads)
    kh = _dense(p["k_proj"], k).reshape(*k.shape[:2], n_heads, -1)  # (B, T, H, d)
    vh = _dense(p["v_proj"], v).reshape(*v.shape[:2], n_heads, -1)
    scale = jnp.sqrt(jnp.float32(kh.shape[-1]))
    if q_in.shape[0] == 1:
        qh = jnp.einsum("nc,chd->nhd", q_in[0], wq) + bq
        s = jnp.einsum("nhd,bthd->bhnt", qh, kh) / scale
    else:
        wqk = jnp.einsum("chd,bthd->bhct", wq, kh)
        s = (jnp.einsum("bnc,bhct->bhnt", q_in, wqk) + jnp.einsum("hd,bthd->bht", bq, kh)[:, :, None, :]) / scale
    wo = p["out_proj"]["kernel"].reshape(n_heads, -1, p["out_proj"]["kernel"].shape[-1])
    u = jnp.einsum("bthd,hdc->bhtc", vh, wo)  # values already through the output projection
    return jnp.einsum("bhnt,bhtc->bnc", jax.nn.softmax(s, axis=-1), u) + p["out_proj"]["bias"]


def _conv_transpose_2x2(p: Tree, x: jax.Array) -> jax.Array:
    """Stride-2, kernel-2 transposed conv as a matmul: (..., C) -> (..., 2, 2, O) where
    [..., a, b, :] is output pixel (2i + a, 2j + b). Flax's kernel is stored spatially flipped
    (the converter's rule for torch's ConvTranspose2d), hence the [::-1, ::-1]."""
    k = p["kernel"][::-1, ::-1]  # (2, 2, C, O)
    return jnp.einsum("...c,abco->...abo", x, k) + p["bias"]


def decode_tokens(model: Sam, params: Tree, embedding: jax.Array, coords: jax.Array
                  ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """The two-way transformer and the heads, without the output upscaling.

    embedding (1, h, w, C) NHWC; coords (B, 2) (x, y) one foreground point per prompt in the
    model-input frame. Returns IoU predictions (B, 3), hypernetwork outputs (B, 3, C/8) and the
    image tokens (B, h, w, C) that `upscale_masks_low` turns into the multimask logits.
    """
    cfg = model.config
    b = coords.shape[0]
    sparse, dense, _ = model.apply({"params": params}, coords[:, None, :], jnp.ones((b, 1), jnp.int32),
                                   method=Sam.encode_prompts)
    pe = model.apply({"params": params}, method=Sam.get_dense_pe)
    md = params["mask_decoder"]
    tp = md["transformer"]
    heads = cfg.decoder_num_heads
    n_mask = cfg.num_multimask_outputs + 1
    h, w, c = embedding.shape[1:]

    out_tokens = jnp.concatenate([md["iou_token"]["embedding"], md["mask_tokens"]["embedding"]])
    tokens = jnp.concatenate([jnp.broadcast_to(out_tokens, (b, *out_tokens.shape)), sparse], axis=1)
    keys = (embedding + dense[:1]).reshape(1, h * w, c)  # prompt-independent until layer 0's update
    key_pe = pe.reshape(1, h * w, c)
    queries = tokens
    for i in range(cfg.decoder_depth):
        lp = tp[f"layers_{i}"]
        if i == 0:
            queries = _attention(lp["self_attn"], queries, queries, queries, heads)
        else:
            q = queries + tokens
            queries = queries + _attention(lp["self_attn"], q, q, queries, heads)
        queries = _ln(lp["norm1"], queries, TORCH_LN_EPS)
        k_in = keys + key_pe
        queries = queries + _token_to_image(lp["cross_attn_token_to_image"], queries + tokens, k_in, keys, heads)
        queries = _ln(lp["norm2"], queries, TORCH_LN_EPS)
        mlp = _dense(lp["mlp"]["lin2"], jax.nn.relu(_dense(lp["mlp"]["lin1"], queries)))
        queries = _ln(lp["norm3"], queries + mlp, TORCH_LN_EPS)
        q = queries + tokens
        keys = keys + _image_to_token(lp["cross_attn_image_to_token"], k_in, q, queries, heads)
        keys = _ln(lp["norm4"], keys, TORCH_LN_EPS)
    queries = queries + _token_to_image(tp["final_attn_token_to_image"], queries + tokens, keys + key_pe,
                                        keys, heads)
    queries = _ln(tp["norm_final_attn"], queries, TORCH_LN_EPS)
    hyper = jnp.stack([_mlp(md[f"output_hypernetworks_mlps_{i}"], queries[:, 1 + i], 3)
                       for i in range(1, n_mask)], axis=1)
    iou = _mlp(md["iou_prediction_head"], queries[:, 0], cfg.iou_head_depth)
    keys = jnp.broadcast_to(keys, (b, h * w, c)).reshape(b, h, w, c)
    return iou[:, 1:], hyper, keys


def upscale_masks_low(params: Tree, keys: jax.Array, hyper: jax.Array) -> jax.Array:
    """Output upscaling and the hypernetwork product: image tokens (K, h, w, C) and hypernetwork
    outputs (K, M, C/8) -> low-res logits (K, M, 4h, 4w)."""
    md = params["mask_decoder"]
    k, h, w, _ = keys.shape
    x = _conv_transpose_2x2(md["output_upscaling_0"], keys)  # (K, h, w, 2, 2, C/4)
    x = gelu(_ln(md["output_upscaling_1"], x, SAM_LN_EPS))
    x = gelu(_conv_transpose_2x2(md["output_upscaling_3"], x))  # (K, h, w, a, b, a', b', C/8)
    # Pixel (4y + 2a + a', 4x + 2b + b') of the 4h x 4w grid.
    masks = jnp.einsum("nmc,nyxabuvc->nmyauxbv", hyper, x)
    return masks.reshape(k, hyper.shape[1], 4 * h, 4 * w)


def decode_points(model: Sam, params: Tree, embedding: jax.Array, coords: jax.Array
                  ) -> Tuple[jax.Array, jax.Array]:
    """One foreground point per prompt: embedding (1, h, w, C) NHWC, coords (B, 2) (x, y) in the
    model-input frame -> multimask low-res logits (B, 3, 4h, 4w) and IoU predictions (B, 3),
    as `Sam.decode(embedding, coords[:, None], ones, multimask_output=True)`."""
    iou, hyper, keys = decode_tokens(model, params, embedding, coords)
    return upscale_masks_low(params, keys, hyper), iou
