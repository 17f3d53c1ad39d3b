"""ViT image encoder with windowed / global attention and decomposed relative positions.

Input: normalised, padded images in NHWC, (B, S, S, 3) with S = config.image_size.
Output: image embeddings in NHWC, (B, S/16, S/16, prompt_embed_dim).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from .. import backend
from .common import SAM_LN_EPS, Dtype, MLPBlock, dense, gelu, is_low_precision, layer_norm, product, stream_dtype


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


def window_unpartition(x: jax.Array, window: int, padded_hw: Tuple[int, int], hw: Tuple[int, int]) -> jax.Array:
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
        rel_pos = jax.image.resize(rel_pos, (max_dist, rel_pos.shape[1]), method="linear", antialias=False)
    sq = max(k_size / q_size, 1.0)
    sk = max(q_size / k_size, 1.0)
    q_coords = jnp.arange(q_size, dtype=jnp.float32)[:, None] * sq
    k_coords = jnp.arange(k_size, dtype=jnp.float32)[None, :] * sk
    idx = (q_coords - k_coords + (k_size - 1) * sk).astype(jnp.int32)
    return rel_pos[idx]


# How the encoder's attention is computed. "chunked": the scores as einsums with the relative
# positions added, softmax, then the values; on CPU the global blocks process a few grid rows of
# queries at a time (`backend.attention_chunk_rows`), which XLA:CPU runs fastest.
# "dot_product_attention": `jax.nn.dot_product_attention` with the relative positions as a dense
# bias, which on a CUDA GPU runs cuDNN's fused attention for bf16 / fp16 compute (see
# `backend.fused_attention_kernel`; the bias holds heads x N x N values per image: 16 x 4096 x
# 4096, 0.5 GB in bf16, for a vit_h global block). Both give the same embeddings up to float
# rounding (tests/modeling/test_parity.py).
ATTENTION_IMPLS = ("chunked", "dot_product_attention")


def check_attention_impl(impl: str) -> None:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl must be one of {list(ATTENTION_IMPLS)}, got {impl!r}")


def rel_pos_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    rel_h: jax.Array,
    rel_w: jax.Array,
    chunk_rows: Optional[int] = None,
    dtype: Dtype = None,
) -> jax.Array:
    """softmax(scale * q.k + rel_h + rel_w) @ v over a grid.

    q: (B, nH, H, W, hd), already scaled; k, v: (B, nH, H*W, hd); rel_h: (B, nH, H, W, H) and
    rel_w: (B, nH, H, W, W), the decomposed relative-position terms of every query.
    chunk_rows: None computes all scores at once; r processes r grid rows of queries of one head
    at a time (H must be divisible by r). Rows are independent, so the result is the same.
    dtype: the compute dtype of the two products (`common.product`); the softmax is float32.
    Returns (B, nH, H*W, hd).
    """
    b, n, h, w, hd = q.shape

    def block(qc, kc, vc, rhc, rwc):  # leading dims ..., r, w: one block of query rows
        s = product(jnp.einsum, "...rwc,...kc->...rwk", qc, kc, dtype=dtype).reshape(*qc.shape[:-1], h, w)
        s = s + rhc[..., :, None] + rwc[..., None, :]
        s = jax.nn.softmax(s.reshape(*qc.shape[:-3], -1, h * w).astype(jnp.float32), axis=-1)
        return product(jnp.einsum, "...qk,...kc->...qc", s.astype(vc.dtype), vc, dtype=dtype)

    if chunk_rows is None or chunk_rows >= h:
        return block(q, k, v, rel_h, rel_w)
    if h % chunk_rows:
        raise ValueError(f"chunk_rows {chunk_rows} must divide the grid height {h}")
    c = h // chunk_rows

    def per_head(args):
        qh, kh, vh, rhh, rwh = args

        def rows(x):
            return x.reshape(c, chunk_rows, *x.shape[1:])

        out = jax.lax.map(lambda a: block(a[0], kh, vh, a[1], a[2]), (rows(qh), rows(rhh), rows(rwh)))
        return out.reshape(h * w, hd)

    def heads(x):
        return x.reshape(b * n, *x.shape[2:])

    out = jax.lax.map(per_head, (heads(q), heads(k), heads(v), heads(rel_h), heads(rel_w)))
    return out.reshape(b, n, h * w, hd)


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with decomposed relative positions.

    window_size > 0: attention within windows of that size (`input_size` is the window). The
    official block pads the normalised grid with zeros and partitions it before the qkv
    projection, so padded tokens carry qkv = bias, and crops after the output projection; here
    both projections run on the H*W real tokens only and the qkv of the padding is set to the
    bias: the same attention (the zeros' products are exactly zero), without projecting the
    padding (4900 vs 4096 tokens per ViT block at 1024 px).
    """

    num_heads: int
    input_size: Tuple[int, int]
    dtype: Dtype = None
    window_size: int = 0
    attention_impl: str = "chunked"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_attention_impl(self.attention_impl)
        dim = x.shape[-1]
        n, hd = self.num_heads, dim // self.num_heads
        rel_pos_h = self.param("rel_pos_h", nn.initializers.zeros, (2 * self.input_size[0] - 1, hd))
        rel_pos_w = self.param("rel_pos_w", nn.initializers.zeros, (2 * self.input_size[1] - 1, hd))

        # qkv channels are ordered [q | k | v], each head-major.
        qkv_layer = dense(3 * dim, self.dtype, "qkv")
        qkv = qkv_layer(x)
        if self.window_size > 0:
            gh, gw = x.shape[1:3]
            pad_h, pad_w = (-gh) % self.window_size, (-gw) % self.window_size
            if pad_h or pad_w:
                rows = jnp.arange(gh + pad_h)[:, None, None] < gh
                cols = jnp.arange(gw + pad_w)[None, :, None] < gw
                bias = qkv_layer(jnp.zeros((1, dim), x.dtype))[0]  # the projection of a zero token
                qkv = jnp.where(rows & cols, jnp.pad(qkv, ((0, 0), (0, pad_h), (0, pad_w), (0, 0))), bias)
            qkv, padded = window_partition(qkv, self.window_size)
        b, h, w = qkv.shape[:3]
        qkv = qkv.reshape(b, h * w, 3, n, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, nH, N, hd)

        # Relative positions use the unscaled q.
        q = q.reshape(b, n, h, w, hd)
        dt = self.dtype
        rel_h = product(jnp.einsum, "bnhwc,hkc->bnhwk", q, get_rel_pos(h, h, rel_pos_h).astype(q.dtype), dtype=dt)
        rel_w = product(jnp.einsum, "bnhwc,wkc->bnhwk", q, get_rel_pos(w, w, rel_pos_w).astype(q.dtype), dtype=dt)
        if self.attention_impl == "dot_product_attention":
            # The decomposed relative positions as a dense (B, nH, N, N) bias: cuDNN's fused
            # attention on GPUs (bf16 / fp16), XLA's elsewhere. Its inputs are in the compute
            # dtype (it accumulates the scores and takes the softmax in float32 itself).
            bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, n, h * w, h * w)
            cdt = dt if is_low_precision(dt) else q.dtype

            def bthd(t):  # (B, nH, N, hd) -> (B, N, nH, hd), in the compute dtype
                return t.transpose(0, 2, 1, 3).astype(cdt)

            out = jax.nn.dot_product_attention(
                bthd(q.reshape(b, n, h * w, hd)),
                bthd(k),
                bthd(v),
                bias=bias.astype(cdt),
                scale=hd**-0.5,
                implementation=backend.fused_attention_kernel(cdt, hd),
            )
            out = out.reshape(b, h, w, dim)
        else:
            out = rel_pos_attention(q * (hd**-0.5), k, v, rel_h, rel_w, backend.attention_chunk_rows(h, w), dt)
            out = out.transpose(0, 2, 1, 3).reshape(b, h, w, dim)
        if self.window_size > 0:
            out = window_unpartition(out, self.window_size, padded, (gh, gw))
        return dense(dim, self.dtype, "proj")(out)


class Block(nn.Module):
    """Pre-norm ViT block; window_size 0 means global attention."""

    num_heads: int
    mlp_ratio: float
    window_size: int
    grid_size: int
    dtype: Dtype = None
    attention_impl: str = "chunked"

    @nn.compact
    def __call__(self, x: jax.Array, part: str = "both") -> jax.Array:
        """part: "both" (the block), "attn" (its attention half) or "mlp" (its MLP half)."""
        if part not in ("both", "attn", "mlp"):
            raise ValueError(f"part must be 'both', 'attn' or 'mlp', got {part!r}")
        dim = x.shape[-1]
        if part != "mlp":
            y = layer_norm(SAM_LN_EPS, "norm1", self.dtype)(x)
            size = self.window_size if self.window_size > 0 else self.grid_size
            x = x + Attention(
                self.num_heads,
                (size, size),
                dtype=self.dtype,
                window_size=self.window_size,
                attention_impl=self.attention_impl,
                name="attn",
            )(y)
        if part != "attn":
            y = layer_norm(SAM_LN_EPS, "norm2", self.dtype)(x)
            x = x + MLPBlock(int(dim * self.mlp_ratio), gelu, dtype=self.dtype, name="mlp")(y)
        return x


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
    attention_impl: str = "chunked"  # see ATTENTION_IMPLS

    @nn.compact
    def __call__(
        self, x: jax.Array, layers: Optional[Tuple[int, int]] = None, interm: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Optional[jax.Array]]]:
        """layers=None runs everything. layers=(start, stop) runs one stage of the encoder, counted
        in half-blocks (2i: block i's attention half, 2i + 1: its MLP half): the patch embedding
        first when start == 0 (x is then the images), half-blocks start..stop-1, and the neck when
        stop == 2 * depth; otherwise x and the result are the (B, h, w, embed_dim) token grid.
        Stages chained over 0..2 * depth compute the same as layers=None.

        interm (static): also return SAM-HQ's intermediate embedding, the (B, h, w, embed_dim)
        token grid right after the first global-attention block: (result, interm). A stage that
        does not run that block's MLP half (half-block 2g + 1) returns (result, None)."""
        grid = self.img_size // self.patch_size
        n = 2 * self.depth
        start, stop = (0, n) if layers is None else (int(layers[0]), int(layers[1]))
        if not 0 <= start < stop <= n:
            raise ValueError(f"layers must be (start, stop) with 0 <= start < stop <= {n}, got {layers}")
        if interm and not self.global_attn_indexes:
            raise ValueError("interm: this encoder has no global-attention block (global_attn_indexes is empty)")
        # The half-block after which the intermediate embedding is taken (-1: not asked for).
        interm_at = 2 * min(self.global_attn_indexes) + 1 if interm else -1
        interm_x = None
        if start == 0:
            if x.ndim != 4 or x.shape[1:] != (self.img_size, self.img_size, 3):
                raise ValueError(
                    f"images must have shape (B, {self.img_size}, {self.img_size}, 3) "
                    f"(NHWC, normalised and padded), got {tuple(x.shape)}"
                )
            p = self.patch_size
            x = PatchEmbed(self.embed_dim, p, dtype=self.dtype, name="patch_embed")(x)
            pos_embed = self.param("pos_embed", nn.initializers.zeros, (1, grid, grid, self.embed_dim))
            x = x + pos_embed.astype(x.dtype)
        elif x.ndim != 4 or x.shape[1:] != (grid, grid, self.embed_dim):
            raise ValueError(
                f"tokens between encoder stages must have shape (B, {grid}, {grid}, "
                f"{self.embed_dim}), got {tuple(x.shape)}"
            )
        i = start
        while i < stop:
            b = i // 2
            window = 0 if b in self.global_attn_indexes else self.window_size
            whole = i % 2 == 0 and i + 2 <= stop
            # Remat only matters under a gradient (training runs whole blocks, layers=None).
            block_cls = nn.remat(Block) if self.remat_blocks and whole else Block
            block = block_cls(
                self.num_heads,
                self.mlp_ratio,
                window,
                grid,
                dtype=self.dtype,
                attention_impl=self.attention_impl,
                name=f"blocks_{b}",
            )
            x = block(x) if whole else block(x, "attn" if i % 2 == 0 else "mlp")
            i += 2 if whole else 1
            if i - 1 == interm_at:  # the half-block just run
                interm_x = x
        if stop < n:
            return (x, interm_x) if interm else x
        # Neck: names follow the official nn.Sequential indices 0..3.
        x = _Conv1x1(self.out_chans, dtype=self.dtype, name="neck_0")(x)
        x = layer_norm(SAM_LN_EPS, "neck_1", self.dtype)(x)
        x = _Conv3x3(self.out_chans, dtype=self.dtype, name="neck_2")(x)
        x = layer_norm(SAM_LN_EPS, "neck_3", self.dtype)(x)
        return (x, interm_x) if interm else x


class _Conv1x1(nn.Module):
    """`nn.Conv(features, (1, 1), use_bias=False)` (same parameter) as the matmul it is: XLA:CPU
    ran the neck's 1x1 convolution, fused with the LayerNorm after it, in ~0.35 s (vit_b)."""

    features: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (1, 1, x.shape[-1], self.features))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=stream_dtype(self.dtype))
        return product(jnp.matmul, x, kernel[0, 0], dtype=self.dtype)


class _Conv3x3(nn.Module):
    """`nn.Conv(features, (3, 3), padding=1, use_bias=False)` (same parameter, same function)
    written as one matmul over the nine shifted copies of the input. XLA:CPU ran the neck's 3x3
    convolution at a tenth of its matmul rate (~0.5 s of a vit_b encode, vs ~0.05 s this way)."""

    features: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=stream_dtype(self.dtype))
        h, w = x.shape[1:3]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # Column block (i, j) holds input pixel (y + i - 1, x + j - 1): kernel[i, j] in flax's
        # (cross-correlation) convention, hence the (i, j, c) order of the reshaped kernel.
        cols = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
        return product(jnp.matmul, cols, kernel.reshape(9 * c, self.features), dtype=self.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> embed_dim channels (NHWC in and out)."""

    embed_dim: int
    patch_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _PatchProj(self.embed_dim, self.patch_size, self.dtype, name="proj")(x)


class _PatchProj(nn.Module):
    """`nn.Conv(features, (p, p), strides=p, padding="VALID")` (same parameters, same function)
    as a matmul over the image cut into p x p patches: faster than XLA:CPU's strided conv."""

    features: int
    patch_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        p, c = self.patch_size, x.shape[-1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (p, p, c, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=stream_dtype(self.dtype))
        b, hh, ww = x.shape[0], x.shape[1] // p, x.shape[2] // p
        patches = x[:, : hh * p, : ww * p].reshape(b, hh, p, ww, p, c).transpose(0, 1, 3, 2, 4, 5)
        patches, kernel = patches.reshape(b, hh, ww, p * p * c), kernel.reshape(p * p * c, self.features)
        return product(jnp.matmul, patches, kernel, dtype=self.dtype) + bias
