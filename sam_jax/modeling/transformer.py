"""Two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import TORCH_LN_EPS, Dtype, MLPBlock, layer_norm


class _DenseParams(nn.Module):
    """An `nn.Dense`'s parameters (same names, shapes and initialisers), returned, not applied:
    `Attention` needs the matrices themselves to choose the order of its products."""

    in_features: int
    features: int

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        return kernel, bias


def attention_plan(n_q: int, n_k: int, dim: int, internal: int, heads: int) -> str:
    """Which order of products `Attention` uses for n_q queries and n_k keys: "standard",
    "few_queries" or "few_keys" -- the one with the fewest multiply-adds (see `Attention`)."""
    hd = internal // heads
    proj = n_q * dim * internal + 2 * n_k * dim * internal + n_q * internal * dim
    cost = {
        "standard": proj + 2 * n_q * n_k * internal,
        # q projected; keys/values stay `dim` wide: scores and the weighted sum cost n_k*dim per
        # (query, head); the value and output projections then act on n_q*heads vectors.
        "few_queries": (n_q * dim * internal + n_q * heads * hd * dim + 2 * n_k * dim * n_q * heads
                        + n_q * heads * dim * hd + n_q * internal * dim),
        # k, v projected; queries stay `dim` wide; the output projection is folded into the values.
        "few_keys": (2 * n_k * dim * internal + n_k * heads * hd * dim + n_k * heads * hd * dim
                     + 2 * n_q * dim * n_k * heads),
    }
    return min(cost, key=cost.get)


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`.

    The decoder attends 4096 image tokens to / from a handful of prompt tokens. When one side is
    that small, projecting the big side is most of the work, and the products can be reassociated
    so the big side is never projected (exact algebra; only float rounding differs):
      few queries (token -> image): scores = k_in . (W_k q) + q . b_k, and
        out = (sum_n a_n v_in_n) W_v + b_v (the attention weights sum to 1);
      few keys (image -> token): scores = q_in . (W_q k) + b_q . k, and
        out = sum_t a_t (v_t W_o) + b_o.
    `attention_plan` picks the order with the fewest multiply-adds from the static shapes;
    `plan` forces one (tests compare them).
    """

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = None
    plan: Optional[str] = None

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_valid: Optional[jax.Array] = None) -> jax.Array:
        """q (B, Nq, C), k and v (B, Nk, C); key_valid (B, Nk) bool masks keys out when False."""
        c, heads = self.embedding_dim, self.num_heads
        internal = c // self.downsample_rate
        hd = internal // heads
        wq, bq = _DenseParams(c, internal, name="q_proj")()
        wk, bk = _DenseParams(c, internal, name="k_proj")()
        wv, bv = _DenseParams(c, internal, name="v_proj")()
        wo, bo = _DenseParams(internal, c, name="out_proj")()
        q, k, v, wq, bq, wk, bk, wv, bv, wo, bo = nn.dtypes.promote_dtype(
            q, k, v, wq, bq, wk, bk, wv, bv, wo, bo, dtype=self.dtype)
        b, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
        scale = jnp.sqrt(jnp.asarray(hd, q.dtype))
        plan = self.plan or attention_plan(n_q, n_k, c, internal, heads)
        if plan not in ("standard", "few_queries", "few_keys"):
            raise ValueError(f"plan must be 'standard', 'few_queries' or 'few_keys', got {plan!r}")

        def softmax(scores, valid):  # scores (..., Nk) with `valid` broadcastable to them
            scores = scores.astype(jnp.float32)
            if valid is not None:
                scores = jnp.where(valid, scores, jnp.finfo(jnp.float32).min)
            return jax.nn.softmax(scores, axis=-1).astype(v.dtype)

        if plan == "few_queries":
            qh = (q @ wq + bq).reshape(b, n_q, heads, hd)
            g = jnp.einsum("bthd,chd->bthc", qh, wk.reshape(c, heads, hd)).reshape(b, n_q * heads, c)
            shift = jnp.einsum("bthd,hd->bth", qh, bk.reshape(heads, hd)).reshape(b, n_q * heads, 1)
            # The official code divides the scores after q.k (not q before): keep that order.
            scores = (jnp.einsum("bmc,bnc->bmn", g, k) + shift) / scale
            a = softmax(scores, None if key_valid is None else key_valid[:, None, :])
            z = (a @ v).reshape(b, n_q, heads, c)
            out = jnp.einsum("bthc,chd->bthd", z, wv.reshape(c, heads, hd)) + bv.reshape(heads, hd)
            return out.reshape(b, n_q, internal) @ wo + bo
        if plan == "few_keys":
            kh = (k @ wk + bk).reshape(b, n_k, heads, hd)
            vh = (v @ wv + bv).reshape(b, n_k, heads, hd)
            g = jnp.einsum("bthd,chd->bcht", kh, wq.reshape(c, heads, hd)).reshape(b, c, heads * n_k)
            shift = jnp.einsum("bthd,hd->bht", kh, bq.reshape(heads, hd)).reshape(b, 1, heads * n_k)
            scores = ((q @ g + shift) / scale).reshape(b, n_q, heads, n_k)
            a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :])
            u = jnp.einsum("bthd,hdc->bhtc", vh, wo.reshape(heads, hd, c)).reshape(b, heads * n_k, c)
            return a.reshape(b, n_q, heads * n_k) @ u + bo
        qh = (q @ wq + bq).reshape(b, n_q, heads, hd)
        kh = (k @ wk + bk).reshape(b, n_k, heads, hd)
        vh = (v @ wv + bv).reshape(b, n_k, heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", qh, kh) / scale
        a = softmax(scores, None if key_valid is None else key_valid[:, None, None, :])
        out = jnp.einsum("bhqk,bkhd->bqhd", a, vh).reshape(b, n_q, internal)
        return out @ wo + bo


class TwoWayAttentionBlock(nn.Module):
    """Token self-attention, token->image, MLP, image->token; post-norm, torch LayerNorm eps."""

    embedding_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    skip_first_layer_pe: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, queries, keys, query_pe, key_pe, token_valid=None):
        c, h, dt = self.embedding_dim, self.num_heads, self.dtype
        if self.skip_first_layer_pe:
            # Layer 0: no positional encoding AND no residual, as in the official block.
            queries = Attention(c, h, dtype=dt, name="self_attn")(queries, queries, queries, token_valid)
        else:
            q = queries + query_pe
            queries = queries + Attention(c, h, dtype=dt, name="self_attn")(q, q, queries, token_valid)
        queries = layer_norm(TORCH_LN_EPS, "norm1", dt)(queries)

        q, k = queries + query_pe, keys + key_pe
        queries = queries + Attention(c, h, self.downsample_rate, dtype=dt,
                                      name="cross_attn_token_to_image")(q, k, keys)
        queries = layer_norm(TORCH_LN_EPS, "norm2", dt)(queries)

        queries = queries + MLPBlock(self.mlp_dim, nn.relu, dtype=dt, name="mlp")(queries)
        queries = layer_norm(TORCH_LN_EPS, "norm3", dt)(queries)

        q, k = queries + query_pe, keys + key_pe
        keys = keys + Attention(c, h, self.downsample_rate, dtype=dt,
                                name="cross_attn_image_to_token")(k, q, queries, token_valid)
        keys = layer_norm(TORCH_LN_EPS, "norm4", dt)(keys)
        return queries, keys


class TwoWayTransformer(nn.Module):
    """Decoder transformer over (tokens, image).

    Args:
      depth (int): number of two-way blocks.
      embedding_dim (int): channel width C.
      num_heads (int): attention heads.
      mlp_dim (int): hidden width of the token MLP.
    """

    depth: int
    embedding_dim: int
    num_heads: int
    mlp_dim: int
    downsample_rate: int = 2
    dtype: Dtype = None

    @nn.compact
    def __call__(self, image_embedding: jax.Array, image_pe: jax.Array, point_embedding: jax.Array,
                 token_valid: Optional[jax.Array] = None) -> Tuple[jax.Array, jax.Array]:
        """image_embedding and image_pe (B, h, w, C) NHWC; point_embedding (B, T, C).

        Returns the processed tokens (B, T, C) and image tokens (B, h*w, C) in row-major order.
        """
        b, hh, ww, c = image_embedding.shape
        keys = image_embedding.reshape(b, hh * ww, c)
        key_pe = image_pe.reshape(b, hh * ww, c)
        queries = point_embedding
        for i in range(self.depth):
            queries, keys = TwoWayAttentionBlock(
                c, self.num_heads, self.mlp_dim, self.downsample_rate, skip_first_layer_pe=(i == 0),
                dtype=self.dtype, name=f"layers_{i}")(queries, keys, point_embedding, key_pe, token_valid)
        q, k = queries + point_embedding, keys + key_pe
        queries = queries + Attention(c, self.num_heads, self.downsample_rate, dtype=self.dtype,
                                      name="final_attn_token_to_image")(q, k, keys)
        queries = layer_norm(TORCH_LN_EPS, "norm_final_attn", self.dtype)(queries)
        return queries, keys
