"""Layers shared by the SAM components.

Every module here pins the numerics the official PyTorch code uses, instead of Flax defaults
(LayerNorm epsilon and variance formula, exact-erf GELU).

Compute dtype. Every module takes `dtype`: None (or float32) computes in the inputs' and params'
type, float32 for the official weights. A 16-bit float (`jnp.bfloat16`, `jnp.float16`) is used
for the operands of the products only, the matmuls, einsums and convolutions, which accumulate
and return float32 (`product`, `dense`, `conv`: what matrix units run at full rate); everything
else, the residual stream, LayerNorm, softmax, GELU, biases and the BatchNorm folding, stays
float32 (`stream_dtype`). Params may be float32 or bfloat16 either way.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# torch.nn.LayerNorm's default epsilon: the norms of the two-way transformer use it.
TORCH_LN_EPS = 1e-5
# The image encoder's blocks and every LayerNorm2d use 1e-6.
SAM_LN_EPS = 1e-6


_LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_low_precision(dtype: Dtype) -> bool:
    """Whether `dtype` is a 16-bit float compute dtype (products in it, the rest in float32)."""
    return dtype is not None and jnp.dtype(dtype) in _LOW_PRECISION


def stream_dtype(dtype: Dtype) -> Dtype:
    """The dtype of everything but the products' operands under compute dtype `dtype`: float32
    for a 16-bit one, else `dtype` itself (None: the inputs' and params' type, as Flax promotes)."""
    return jnp.float32 if is_low_precision(dtype) else dtype


def product(fn: Callable[..., jax.Array], *args: Any, dtype: Dtype = None, **kw: Any) -> jax.Array:
    """`fn(*args, **kw)`, a product (`jnp.matmul`, `jnp.einsum` with its spec first,
    `jax.lax.dot_general`, `jax.lax.conv_general_dilated`), in the compute dtype `dtype`.

    A 16-bit dtype: the floating operands cast to it, the accumulation and the result float32
    (`preferred_element_type`): what GPU / TPU matrix units run at full rate. A product that
    returns bf16 instead rounds every output to 8 significand bits (on vit_b against the official
    fp32 predictor: mean mask IoU 0.9950 vs 0.9962, embedding error 1.8x; tests/modeling/
    test_bf16.py). Otherwise (None, float32): exactly `fn(*args, **kw)`."""
    if not is_low_precision(dtype):
        return fn(*args, **kw)
    args = tuple(
        a.astype(dtype) if isinstance(a, (jax.Array, np.ndarray)) and jnp.issubdtype(a.dtype, jnp.floating) else a
        for a in args
    )
    return fn(*args, preferred_element_type=jnp.float32, **kw)


def _lax_dot_general(*args: Any, **kw: Any) -> jax.Array:
    # Looked up at call time: qwix (`sam_jax.quantize`) intercepts `jax.lax.dot_general`.
    return jax.lax.dot_general(*args, **kw)


def _lax_conv(*args: Any, **kw: Any) -> jax.Array:
    return jax.lax.conv_general_dilated(*args, **kw)


def dense(features: int, dtype: Dtype = None, name: str | None = None, **kw: Any) -> nn.Dense:
    """`nn.Dense(features, dtype=dtype, name=name, **kw)` under compute dtype `dtype`: its product
    a `product` and its bias added in float32 under a 16-bit dtype; Flax's plain Dense otherwise."""
    if is_low_precision(dtype):
        kw["dot_general"] = functools.partial(product, _lax_dot_general, dtype=dtype)
    return nn.Dense(features, dtype=stream_dtype(dtype), name=name, **kw)


def conv(features: int, kernel_size: Any, dtype: Dtype = None, name: str | None = None, **kw: Any) -> nn.Conv:
    """`nn.Conv(features, kernel_size, dtype=dtype, name=name, **kw)` under compute dtype `dtype`
    (see `dense`)."""
    if is_low_precision(dtype):
        kw["conv_general_dilated"] = functools.partial(product, _lax_conv, dtype=dtype)
    return nn.Conv(features, kernel_size, dtype=stream_dtype(dtype), name=name, **kw)


def layer_norm(eps: float, name: str, dtype: Dtype = None) -> nn.LayerNorm:
    """LayerNorm over the last (channel) axis with the two-pass variance torch computes, in
    `stream_dtype(dtype)` (statistics and output float32 under a 16-bit compute dtype).

    In NHWC, the official `LayerNorm2d` (normalise over channels of NCHW) is exactly this too.
    """
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=stream_dtype(dtype), name=name)


class MatmulLayerNorm(nn.Module):
    """`layer_norm` (same parameters, two-pass variance, statistics in float32) with the row
    means taken as matmuls with a 1/C column instead of reductions.

    For many rows of few channels, XLA:CPU splits each reduction into a partial-sum pass and a
    final one; a matrix-vector product reads the rows once. The decoder uses it for its
    (4096, 256) and (16384 x 4, 64) norms: ~4% of a vit_b decode (same-run A/B, 300 rounds).
    """

    epsilon: float
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,))
        bias = self.param("bias", nn.initializers.zeros_init(), (c,))
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        avg = jnp.full((c, 1), 1.0 / c, xf.dtype)
        mean = jnp.matmul(xf, avg, precision=jax.lax.Precision.HIGHEST)
        d = xf - mean
        var = jnp.matmul(d * d, avg, precision=jax.lax.Precision.HIGHEST)
        y = d * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(stream_dtype(self.dtype) or jnp.result_type(x.dtype, scale.dtype))


def gelu(x: jax.Array) -> jax.Array:
    """torch.nn.GELU(): the exact erf form, not Flax's tanh default, written as torch computes
    it (x/2 (1 + erf(x/sqrt 2))); `nn.gelu(approximate=False)` goes through erfc, ~3x slower on CPU."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class MLPBlock(nn.Module):
    """lin1 -> activation -> lin2 (the ViT and two-way-transformer MLPs)."""

    mlp_dim: int
    act: Callable[[jax.Array], jax.Array] = gelu
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x = dense(self.mlp_dim, self.dtype, "lin1")(x)
        return dense(d, self.dtype, "lin2")(self.act(x))


class MLP(nn.Module):
    """`num_layers` Dense layers named layers_0.. with ReLU between them (hypernetwork, IoU head)."""

    hidden_dim: int
    output_dim: int
    num_layers: int
    dtype: Dtype = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = dense(self.output_dim if last else self.hidden_dim, self.dtype, f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x
