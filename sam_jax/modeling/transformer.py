"""Two-way transformer: prompt tokens and image tokens attend to each other."""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import TORCH_LN_EPS, Dtype, MLPBlock, layer_norm


class Attention(nn.Module):
    """Multi-head attention whose projections may shrink the width by `downsample_rate`."""

    embedding_dim: int
    num_heads: int
    downsample_rate: int = 1
    dtype: Dtype = None

    @nn.compact
    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array,
                 key_valid: Optional[jax.Array] = None) -> jax.Array:
        """q (B, Nq, C), k and v (B, Nk, C); key_valid (B, Nk) bool masks keys out when False."""
        internal = self.embedding_dim // self.downsample_rate
        hd = internal // self.num_heads
        q = nn.Dense(internal, dtype=self.dtype, name="q_proj")(q)
        k = nn.Dense(internal, dtype=self.dtype, name="k_proj")(k)
        v = nn.Dense(internal, dtype=self.dtype, name="v_proj")(v)
        q = q.reshape(*q.shape[:2], self.num_heads, hd)
        k = k.reshape(*k.shape[:2], self.num_heads, hd)
        v = v.reshape(*v.shape[:2], self.num_heads, hd)
        # The official code divides the scores after q.k (not q before): keep that order.
        attn = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(hd, q.dtype))
        attn = attn.astype(jnp.float32)
        if key_valid is not None:
            attn = jnp.where(key_valid[:, None, None, :], attn, jnp.finfo(jnp.float32).min)
        attn = jax.nn.softmax(attn, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(q.shape[0], q.shape[1], internal)
        return nn.Dense(self.embedding_dim, dtype=self.dtype, name="out_proj")(out)


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
