"""ViT image encoder with windowed / global attention and decomposed relative positions.

Input: normalised, padded images in NHWC, (B, S, S, 3) with S = config.image_size.
Output: image embeddings in NHWC, (B, S/16, S/16, prompt_embed_dim).
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import SAM_LN_EPS, Dtype, MLPBlock, gelu, layer_norm


def window_partition(x: jax.Array, window: int) -> Tuple[jax.Array, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nWin, window, window, C), zero-padding bottom/right first.

    Padded tokens are not masked out later: the official model lets them act as keys and values.
    """
    b, h, w, c = x.shape
    ph, pw = (-h) % window, (-w) % window
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hp, wp = h + ph, w + pw
    x = x.reshape(b, hp // window, window, wp // window, window, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)
    return x, (hp, wp)


def window_unpartition(x: jax.Array, window: int, padded_hw: Tuple[int, int],
                       hw: Tuple[int, int]) -> jax.Array:
    """Inverse of `window_partition`, cropping the padding away."""
    hp, wp = padded_hw
    h, w = hw
    b = x.shape[0] // ((hp // window) * (wp // window))
    x = x.reshape(b, hp // window, wp // window, window, window, -1)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, -1)
    return x[:, :h, :w, :]


def get_rel_pos(q_size: int, k_size: int, rel_pos: jax.Array) -> jax.Array:
    """Relative-position table (L, C) -> per-pair embeddings (q_size, k_size, C).

    R[i, j] = table[i * sq - j * sk + (k_size - 1) * sk] with the official scale factors; the table
    is linearly resampled (torch `interpolate(mode="linear")`, no antialias) only when its length
    differs from 2 * max(q_size, k_size) - 1.
    """
    max_dist = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != max_dist:
        rel_pos = jax.image.resize(rel_pos, (max_dist, rel_pos.shape[1]), method="linear",
                                   antialias=False)
    sq = max(k_size / q_size, 1.0)
    sk = max(q_size / k_size, 1.0)
    q_coords = jnp.arange(q_size, dtype=jnp.float32)[:, None] * sq
    k_coords = jnp.arange(k_size, dtype=jnp.float32)[None, :] * sk
    idx = (q_coords - k_coords + (k_size - 1) * sk).astype(jnp.int32)
    return rel_pos[idx]


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions."""

    num_heads: int
    input_size: Tuple[int, int]
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, dim = x.shape
        hd = dim // self.num_heads
        rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * self.input_size[0] - 1, hd))
        rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * self.input_size[1] - 1, hd))

        # qkv channels are ordered [q | k | v], each head-major.
        qkv = nn.Dense(3 * dim, dtype=self.dtype, name="qkv")(x)
        qkv = qkv.reshape(b, h * w, 3, self.num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nH, N, hd)

        attn = jnp.einsum("bnqd,bnkd->bnqk", q * (hd ** -0.5), k)
        # Relative positions use the unscaled q.
        rh = get_rel_pos(h, h, rel_pos_h).astype(q.dtype)
        rw = get_rel_pos(w, w, rel_pos_w).astype(q.dtype)
        r_q = q.reshape(b, self.num_heads, h, w, hd)
        rel_h = jnp.einsum("bnhwc,hkc->bnhwk", r_q, rh)
        rel_w = jnp.einsum("bnhwc,wkc->bnhwk", r_q, rw)
        attn = attn.reshape(b, self.num_heads, h, w, h, w)
        attn = attn + rel_h[..., :, None] + rel_w[..., None, :]
        attn = attn.reshape(b, self.num_heads, h * w, h * w)
        attn = jax.nn.softmax(attn.astype(jnp.float32), axis=-1).astype(v.dtype)

        out = jnp.einsum("bnqk,bnkd->bqnd", attn, v).reshape(b, h, w, dim)
        return nn.Dense(dim, dtype=self.dtype, name="proj")(out)


class Block(nn.Module):
    """Pre-norm ViT block; window_size 0 means global attention."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    grid_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        shortcut = x
        x = layer_norm(SAM_LN_EPS, "norm1", self.dtype)(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, padded = window_partition(x, self.window_size)
            size = (self.window_size, self.window_size)
        else:
            size = (self.grid_size, self.grid_size)
        x = Attention(self.num_heads, size, dtype=self.dtype, name="attn")(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, padded, (h, w))
        x = shortcut + x
        y = layer_norm(SAM_LN_EPS, "norm2", self.dtype)(x)
        return x + MLPBlock(int(dim * self.mlp_ratio), gelu, dtype=self.dtype, name="mlp")(y)


class ImageEncoderViT(nn.Module):
    """SAM's ViT backbone and neck. (B, S, S, 3) NHWC -> (B, S/p, S/p, out_chans) NHWC."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: Tuple[int, ...]
    img_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    out_chans: int = 256
    dtype: Dtype = None
    remat_blocks: bool = False  # recompute block activations in the backward pass (fine-tuning)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        grid = self.img_size // self.patch_size
        if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
            raise ValueError(f"images must have shape (B, {self.img_size}, {self.img_size}, 3) "
                             f"(NHWC, normalised and padded), got {tuple(x.shape)}")
        p = self.patch_size
        x = PatchEmbed(self.embed_dim, p, dtype=self.dtype, name="patch_embed")(x)
        pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim))
        x = x + pos_embed.astype(x.dtype)
        block_cls = nn.remat(Block) if self.remat_blocks else Block
        for i in range(self.depth):
            window = 0 if i in self.global_attn_indexes else self.window_size
            x = block_cls(self.num_heads, self.mlp_ratio, window, grid, dtype=self.dtype,
                      name=f"blocks_{i}")(x)
        # Neck: names follow the official nn.Sequential indices 0..3.
        x = nn.Conv(self.out_chans, (1, 1), use_bias=False, dtype=self.dtype, name="neck_0")(x)
        x = layer_norm(SAM_LN_EPS, "neck_1", self.dtype)(x)
        x = nn.Conv(self.out_chans, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                    dtype=self.dtype, name="neck_2")(x)
        return layer_norm(SAM_LN_EPS, "neck_3", self.dtype)(x)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> embed_dim channels (NHWC in and out)."""

    embed_dim: int
    patch_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p = self.patch_size
        return nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                       name="proj")(x)
