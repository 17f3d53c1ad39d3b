"""Layers shared by the SAM components.

Every module here pins the numerics the official PyTorch code uses, instead of Flax defaults
(LayerNorm epsilon and variance formula, exact-erf GELU).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torch.nn.LayerNorm's default epsilon: the norms of the two-way transformer use it.
TORCH_LN_EPS = 1e-5
# The image encoder's blocks and every LayerNorm2d use 1e-6.
SAM_LN_EPS = 1e-6


def layer_norm(eps: float, name: str, dtype: Dtype = None) -> nn.LayerNorm:
    """LayerNorm over the last (channel) axis with the two-pass variance torch computes.

    In NHWC, the official `LayerNorm2d` (normalise over channels of NCHW) is exactly this too.
    """
    return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


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
        return y.astype(self.dtype or jnp.result_type(x.dtype, scale.dtype))


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
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, name="lin1")(x)
        return nn.Dense(d, dtype=self.dtype, name="lin2")(self.act(x))


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
            x = nn.Dense(self.output_dim if last else self.hidden_dim, dtype=self.dtype, name=f"layers_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x
