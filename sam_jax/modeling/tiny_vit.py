"""MobileSAM's image encoder: TinyViT, distilled from SAM's ViT-H (~5.7 M parameters).

Input and output as `ImageEncoderViT`: normalised, padded images (B, S, S, 3) NHWC ->
image embeddings (B, S/16, S/16, out_chans) NHWC. The reference is `TinyViT` of
`mobile_sam/modeling/tiny_vit_sam.py` (PyPI mobilesam-mirror 1.0.0) as `build_sam_vit_t`
configures it (the defaults below), in inference form (BatchNorm with its running statistics):

  patch_embed   conv 3x3 s2 + BN, GELU, conv 3x3 s2 + BN                          S -> S/4
  layers_0      MBConv blocks: 1x1 + BN, GELU, depthwise 3x3 + BN, GELU, 1x1 + BN,
                + shortcut, GELU; then a patch merging                            -> S/8
  layers_1..3   TinyViT blocks: x + windowed attention (own pre-norm, a learned bias per
                head and |dy|, |dx| offset; zero-padded windows, padding not masked),
                depthwise 3x3 + BN ("local_conv"), x + MLP (own pre-norm); a patch merging
                after layers_1 (-> S/16) and layers_2 (stride 1, see MERGE_STRIDE_1_DIMS)
  neck          SAM's: 1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d (eps 1e-6)
  patch merging 1x1 + BN, GELU, depthwise 3x3 (stride 2 or 1) + BN, GELU, 1x1 + BN

Parameter names: the Flax path of an official key `image_encoder.<module>.<leaf>` is the rule of
`checkpoints/official.py`: a numeric part joins the part before it with "_", "." becomes "/"
("layers.1.blocks.0.attn.qkv" -> "layers_1/blocks_0/attn/qkv"); the leaf "weight" becomes
"kernel" (convs, Linear; torch layouts transposed as for SAM) or "scale" (LayerNorm, BatchNorm);
every other leaf keeps its name (bias, running_mean, running_var, attention_biases). The running
statistics are parameters here (like the prompt encoder's Fourier matrix, a torch buffer), so
every params-only path (load, save, jit, predictor) carries them; they must never be trained.
Not parameters: `num_batches_tracked` (a training counter), `attention_bias_idxs` (a
non-persistent buffer, rebuilt from the window size by `attention_bias_idxs`) and the unused
classifier `norm_head.*` / `head.*` (the forward never calls it).
"""

from __future__ import annotations

from typing import Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .common import SAM_LN_EPS, TORCH_LN_EPS, Dtype, dense, gelu, layer_norm, product, stream_dtype
from .image_encoder import _Conv1x1, _Conv3x3, window_partition, window_unpartition

# torch.nn.BatchNorm2d's default epsilon (Conv2d_BN does not change it).
BN_EPS = 1e-5
# The reference's PatchMerging uses stride 1 instead of 2 when its output has one of these
# widths: in MobileSAM only the last merge (160 -> 320), which keeps the grid at S/16.
MERGE_STRIDE_1_DIMS = (320, 448, 576)


def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
    """torch Conv2d(C, C, k, stride, padding=k // 2, groups=C) in NHWC: x (B, H, W, C), kernel
    (k, k, 1, C) (the Flax layout of a depthwise kernel) -> (B, H', W', C), H' = (H - 1) // s + 1.

    Written as k * k shifted multiply-adds, which XLA:CPU fuses into one loop; its grouped
    convolution (`feature_group_count=C`) was 2-26x slower. Measured 2026-12-05, jax 0.10.2,
    2-core EPYC shared with another job (load ~2.4: absolute times inflated), fp32, batch 1,
    median of 20, ms as grouped conv / shifted adds / torch 2.13 (2 threads): 256 channels at
    256 x 256 (MBConv) 656 / 146 / 180; 128 channels 256 -> 128 stride 2 (merge) 111 / 49 / 50;
    160 channels at 64 x 64 (local_conv) 20.8 / 0.8 / 31.8; 320 channels at 64 x 64 41.6 / 2.3 /
    32.0. Max difference from torch 4.8e-7 (outputs of std ~1), the grouped conv's 1.2e-6.
    """
    k = kernel.shape[0]
    p = k // 2
    b, h, w, c = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            tap = xp[:, i : i + (ho - 1) * stride + 1 : stride, j : j + (wo - 1) * stride + 1 : stride]
            out = tap * kernel[i, j, 0] if out is None else out + tap * kernel[i, j, 0]
    return out


def attention_bias_idxs(h: int, w: int) -> np.ndarray:
    """The reference's `attention_bias_idxs` buffer for an h x w window: (h*w, h*w) int32, the
    column of `attention_biases` for query p and key q. The reference numbers the offsets
    (|dy|, |dx|) in order of first appearance over row-major point pairs; every offset appears
    first in the row of point (0, 0), so the number is |dy| * w + |dx|."""
    ys, xs = np.divmod(np.arange(h * w), w)
    return (np.abs(ys[:, None] - ys[None, :]) * w + np.abs(xs[:, None] - xs[None, :])).astype(np.int32)


class _Kernel(nn.Module):
    """The weight of a bias-free torch Conv2d ("c" of Conv2d_BN), Flax layout (k, k, in, out)."""

    shape: Tuple[int, ...]

    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("kernel", nn.initializers.lecun_normal(), self.shape)


class _BatchNorm(nn.Module):
    """torch BatchNorm2d in eval mode, as the per-channel affine map y * a + b it is."""

    features: int

    @nn.compact
    def __call__(self) -> Tuple[jax.Array, jax.Array]:
        f = (self.features,)
        scale = self.param("scale", nn.initializers.ones_init(), f)
        bias = self.param("bias", nn.initializers.zeros_init(), f)
        mean = self.param("running_mean", nn.initializers.zeros_init(), f)
        var = self.param("running_var", nn.initializers.ones_init(), f)
        a = scale * jax.lax.rsqrt(var + BN_EPS)
        return a, bias - mean * a


class Conv2dBN(nn.Module):
    """The reference's Conv2d_BN (bias-free conv "c", BatchNorm "bn"), NHWC, the BatchNorm folded
    into the kernel and a bias (as the reference's own `fuse()` does): one conv, no extra pass.

    kernel_size 1: a matmul; depthwise: `depthwise_conv`; otherwise (the patch embedding's two
    3x3 stride-2 convs) XLA's convolution: as one matmul over the nine strided copies of the
    input (like the neck's `_Conv3x3`) it was 2-3x slower (same measurement as `depthwise_conv`:
    3 -> 32 channels at 1024 x 1024 31 ms vs 85 ms, 32 -> 64 at 512 x 512 78 vs 170 ms; torch 63
    and 76 ms). Padding is kernel_size // 2 on every side, as in every Conv2d_BN of TinyViT.
    """

    features: int
    kernel_size: int = 1
    stride: int = 1
    depthwise: bool = False
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        cin = 1 if self.depthwise else x.shape[-1]
        kernel = _Kernel((k, k, cin, self.features), name="c")()
        a, b = _BatchNorm(self.features, name="bn")()
        kernel = kernel * a  # scales the output channels (the last axis, depthwise too)
        # Under a 16-bit compute dtype the depthwise conv (multiply-adds, no product for matrix
        # units) stays in float32 with the rest of the stream.
        x, kernel, b = nn.dtypes.promote_dtype(x, kernel, b, dtype=stream_dtype(self.dtype))
        if self.depthwise:
            y = depthwise_conv(x, kernel, self.stride)
        elif k == 1 and self.stride == 1:
            y = product(jnp.matmul, x, kernel[0, 0], dtype=self.dtype)
        else:
            p = k // 2
            y = product(
                jax.lax.conv_general_dilated,
                x,
                kernel,
                (self.stride, self.stride),
                [(p, p), (p, p)],
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                dtype=self.dtype,
            )
        return y + b


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise, 1x1 project, + shortcut, GELU after the sum."""

    expand_ratio: float
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        hidden = int(c * self.expand_ratio)
        y = gelu(Conv2dBN(hidden, dtype=self.dtype, name="conv1")(x))
        y = gelu(Conv2dBN(hidden, 3, depthwise=True, dtype=self.dtype, name="conv2")(y))
        y = Conv2dBN(c, dtype=self.dtype, name="conv3")(y)
        return gelu(y + x)


class PatchMerging(nn.Module):
    """1x1 to out_dim, GELU, depthwise 3x3 with `stride`, GELU, 1x1: (B, H, W, C) -> (B, H', W', out_dim)."""

    out_dim: int
    stride: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(Conv2dBN(self.out_dim, dtype=self.dtype, name="conv1")(x))
        x = gelu(Conv2dBN(self.out_dim, 3, self.stride, depthwise=True, dtype=self.dtype, name="conv2")(x))
        return Conv2dBN(self.out_dim, dtype=self.dtype, name="conv3")(x)


class Attention(nn.Module):
    """Multi-head self-attention within windows, with its own LayerNorm and a learned bias per head
    and offset. x: (N, window * window, C) tokens (row-major windows) -> the same shape.

    The qkv projection is ordered head-major with [q | k | v] INSIDE each head (the reference
    splits view(B, N, heads, -1) into key_dim, key_dim, d), unlike SAM's ViT ([q | k | v], each
    head-major). Scores are (q . k) * key_dim ** -0.5 + bias.
    """

    num_heads: int
    window_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, c = x.shape
        nh, kd, r = self.num_heads, c // self.num_heads, self.window_size
        biases = self.param("attention_biases", nn.initializers.zeros_init(), (nh, r * r))
        x = layer_norm(TORCH_LN_EPS, "norm", self.dtype)(x)
        qkv = dense(3 * c, self.dtype, "qkv")(x).reshape(b, n, nh, 3, kd)
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        s = product(jnp.einsum, "bqhd,bkhd->bhqk", q, k, dtype=self.dtype) * jnp.asarray(kd**-0.5, q.dtype)
        s = s + biases[:, attention_bias_idxs(r, r)].astype(s.dtype)
        p = jax.nn.softmax(s.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = product(jnp.einsum, "bhqk,bkhd->bqhd", p, v, dtype=self.dtype).reshape(b, n, c)
        return dense(c, self.dtype, "proj")(out)


class Mlp(nn.Module):
    """norm (eps 1e-5) -> fc1 -> GELU -> fc2."""

    hidden: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(TORCH_LN_EPS, "norm", self.dtype)(x)
        y = gelu(dense(self.hidden, self.dtype, "fc1")(y))
        return dense(x.shape[-1], self.dtype, "fc2")(y)


class TinyViTBlock(nn.Module):
    """x + window attention (zero-padded to whole windows, padding unmasked, cropped after), then
    the depthwise local_conv, then x + MLP. (B, H, W, C) -> (B, H, W, C)."""

    num_heads: int
    window_size: int
    mlp_ratio: float
    local_conv_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        ws = self.window_size
        # Padding BEFORE the attention's own LayerNorm, as the reference: padded tokens enter the
        # attention as the norm's bias, projected.
        win, padded = window_partition(x, ws)
        y = Attention(self.num_heads, ws, dtype=self.dtype, name="attn")(win.reshape(-1, ws * ws, c))
        x = x + window_unpartition(y.reshape(-1, ws, ws, c), ws, padded, (h, w))
        x = Conv2dBN(c, self.local_conv_size, depthwise=True, dtype=self.dtype, name="local_conv")(x)
        return x + Mlp(int(c * self.mlp_ratio), dtype=self.dtype, name="mlp")(x)


class _Stage(nn.Module):
    """`layers.i` of the reference: MBConv blocks (stage 0, a ConvLayer) or TinyViT blocks (a
    BasicLayer), then the patch merging "downsample" to out_dim (None: no merging)."""

    depth: int
    conv: bool
    out_dim: int | None
    num_heads: int
    window_size: int
    mlp_ratio: float
    mbconv_expand_ratio: float
    local_conv_size: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.depth):
            if self.conv:
                x = MBConv(self.mbconv_expand_ratio, dtype=self.dtype, name=f"blocks_{i}")(x)
            else:
                x = TinyViTBlock(
                    self.num_heads,
                    self.window_size,
                    self.mlp_ratio,
                    self.local_conv_size,
                    dtype=self.dtype,
                    name=f"blocks_{i}",
                )(x)
        if self.out_dim is not None:
            stride = 1 if self.out_dim in MERGE_STRIDE_1_DIMS else 2
            x = PatchMerging(self.out_dim, stride, dtype=self.dtype, name="downsample")(x)
        return x


class TinyViT(nn.Module):
    """MobileSAM's TinyViT image encoder with SAM's neck. (B, S, S, 3) NHWC -> (B, S/16, S/16, out_chans).

    Args:
      img_size (int): input side S.
      embed_dims (tuple[int, ...]): channels of the four stages; a merge into a width of
        MERGE_STRIDE_1_DIMS keeps the grid, any other halves it, and the output grid must be S/16.
      depths (tuple[int, ...]): blocks per stage (stage 0: MBConv, the others: TinyViT blocks).
      num_heads, window_sizes (tuple[int, ...]): per stage (stage 0's are unused, as in the reference).
      mlp_ratio (float): MLP hidden width / stage width.
      mbconv_expand_ratio (float): MBConv hidden width / stage width.
      local_conv_size (int): kernel of the depthwise conv between attention and MLP.
      out_chans (int): channels of the neck (SAM's prompt_embed_dim).
      dtype: compute dtype (None: the inputs' / params').
    """

    img_size: int = 1024
    embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    depths: Tuple[int, ...] = (2, 2, 6, 2)
    num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    out_chans: int = 256
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.img_size
        if x.ndim != 4 or x.shape[1:] != (s, s, 3):
            raise ValueError(
                f"images must have shape (B, {s}, {s}, 3) (NHWC, normalised and padded), got {tuple(x.shape)}"
            )
        n = len(self.embed_dims)
        if not len(self.depths) == len(self.num_heads) == len(self.window_sizes) == n:
            raise ValueError("embed_dims, depths, num_heads and window_sizes need one entry per stage")
        down = 4 * 2 ** sum(d not in MERGE_STRIDE_1_DIMS for d in self.embed_dims[1:])
        if down != 16 or s % 16:
            raise ValueError(
                f"TinyViT must reduce the image 16x (like SAM's ViT); embed_dims {self.embed_dims} "
                f"at image size {s} reduce it {down}x"
            )
        c0 = self.embed_dims[0]
        x = _PatchEmbed(c0, dtype=self.dtype, name="patch_embed")(x)
        for i in range(n):
            x = _Stage(
                self.depths[i],
                i == 0,
                self.embed_dims[i + 1] if i + 1 < n else None,
                self.num_heads[i],
                self.window_sizes[i],
                self.mlp_ratio,
                self.mbconv_expand_ratio,
                self.local_conv_size,
                dtype=self.dtype,
                name=f"layers_{i}",
            )(x)
        # Neck: names follow the reference's nn.Sequential indices 0..3, as in ImageEncoderViT.
        x = _Conv1x1(self.out_chans, dtype=self.dtype, name="neck_0")(x)
        x = layer_norm(SAM_LN_EPS, "neck_1", self.dtype)(x)
        x = _Conv3x3(self.out_chans, dtype=self.dtype, name="neck_2")(x)
        return layer_norm(SAM_LN_EPS, "neck_3", self.dtype)(x)


class _PatchEmbed(nn.Module):
    """patch_embed: `seq_0` conv 3x3 s2 + BN to embed_dim / 2, GELU, `seq_2` conv 3x3 s2 + BN."""

    embed_dim: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = gelu(Conv2dBN(self.embed_dim // 2, 3, 2, dtype=self.dtype, name="seq_0")(x))
        return Conv2dBN(self.embed_dim, 3, 2, dtype=self.dtype, name="seq_2")(x)
