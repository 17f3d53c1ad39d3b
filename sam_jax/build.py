"""Building models and their parameter trees."""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any, Dict

import jax
import jax.numpy as jnp

from .config import ConfigLike, SamConfig, get_config
from .modeling import Sam
from .modeling.image_encoder import check_attention_impl

Params = Dict[str, Any]


def build_sam(
    config: ConfigLike = "vit_h", dtype: Any = None, remat_encoder: bool = False, attention_impl: str = "chunked"
) -> Sam:
    """Returns the `Sam` module for a preset name ("vit_b", "vit_l", "vit_h", "default", "tiny")
    or a `SamConfig`. `dtype` is the compute dtype (e.g. jnp.bfloat16); params stay as given.
    `remat_encoder` recomputes encoder-block activations in the backward pass (saves memory).
    `attention_impl` is the encoder's attention: "chunked" (default; fastest on CPU) or
    "dot_product_attention" (`jax.nn.dot_product_attention`, cuDNN on GPUs in bf16); see
    `modeling.image_encoder.ATTENTION_IMPLS`. A loaded model switches with
    `model.clone(attention_impl=...)`."""
    check_attention_impl(attention_impl)
    return Sam(get_config(config), dtype=dtype, remat_encoder=remat_encoder, attention_impl=attention_impl)


def _dummy_inputs(config: SamConfig):
    s, m = config.image_size, config.mask_input_size
    return (
        jnp.zeros((1, s, s, 3), jnp.float32),
        jnp.zeros((1, 1, 2), jnp.float32),
        jnp.ones((1, 1), jnp.int32),
        jnp.zeros((1, 4), jnp.float32),
        jnp.zeros((1, m, m), jnp.float32),
    )


def init_params(model: Sam, rng: jax.Array) -> Params:
    """Randomly initialised params (Flax default init; rel-pos and pos-embed start at zero)."""
    return jax.jit(partial(model.init, method=Sam.init_all))(rng, *_dummy_inputs(model.config))["params"]


def param_shapes(model: Sam) -> Params:
    """The parameter tree as `jax.ShapeDtypeStruct`s, computed without allocating anything."""
    return jax.tree_util.tree_map(lambda x: x, _param_shapes(model))  # a fresh tree: callers may edit it


@lru_cache(maxsize=16)
def _param_shapes(model: Sam) -> Params:
    # Tracing the whole init costs ~1.7 s for vit_b, and every load and save checks params against
    # it; a Sam module is hashable by its fields (config, dtype, ...), which fix the shapes.
    # The dummy inputs are made inside the traced function: abstract, never allocated (a config
    # read from a file may ask for any image size).
    return jax.eval_shape(
        lambda rng: model.init(rng, *_dummy_inputs(model.config), method=Sam.init_all), jax.random.PRNGKey(0)
    )["params"]


def count_params(tree: Params) -> int:
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(tree))
