"""LoRA adapters on the image encoder's attention projections, through qwix's interception.

qwix (`pip install qwix`, in the `train` extra) wraps a Flax linen module so that the matmuls of
the matched Dense layers compute x W + (x A) B * alpha / rank, with A (in, rank) and B (rank, out)
stored next to the kernel as `kernel_lora_a` / `kernel_lora_b`. The modeling code is unchanged.

`merge_lora` folds the adapters back into plain params (W + A B alpha / rank), which every other
tool (save, export to .pth, the predictor) understands.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
from flax import traverse_util

from ..modeling import Sam

Params = Dict[str, Any]

# The qkv and output projections of every attention block of the image encoder: SAM's ViT
# (blocks_i) and MobileSAM's TinyViT (layers_s/blocks_i).
DEFAULT_TARGETS = r"image_encoder/(layers_\d+/)?blocks_\d+/attn/(qkv|proj)"
LORA_A, LORA_B = "kernel_lora_a", "kernel_lora_b"


def _qwix():
    try:
        import qwix
    except ImportError:
        raise ImportError("LoRA needs qwix: pip install 'sam-jax[train]'") from None
    return qwix


def lora_model(model: Sam, rank: int, alpha: float, targets: str = DEFAULT_TARGETS) -> Sam:
    """`model` with LoRA adapters of `rank` on the Dense layers whose path matches `targets`
    (a regex); the adapters' output is scaled by alpha / rank. Intercepts `encode_image` only."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    qwix = _qwix()
    rule = qwix.LoraRule(module_path=targets, rank=rank, alpha=float(alpha))
    return qwix.apply_lora_to_model(model, qwix.LoraProvider([rule]), methods=("encode_image",))


def add_lora(
    model: Sam,
    params: Params,
    key: jax.Array,
    rank: int = 4,
    alpha: float | None = None,
    targets: str = DEFAULT_TARGETS,
) -> Tuple[Sam, Params]:
    """Returns (LoRA model, params with adapters added). A starts He-uniform, B at zero, so the
    model's outputs are unchanged until training moves B. `alpha` defaults to `rank` (scale 1)."""
    alpha = float(rank if alpha is None else alpha)
    lm = lora_model(model, rank, alpha, targets)
    s = model.config.image_size
    shapes = jax.eval_shape(
        lambda k: lm.init(k, jnp.zeros((1, s, s, 3)), method="encode_image"), jax.random.PRNGKey(0)
    )["params"]
    flat = traverse_util.flatten_dict(shapes)
    adapters = sorted(k for k in flat if k[-1] in (LORA_A, LORA_B))
    if not adapters:
        raise ValueError(f"targets {targets!r} matches no Dense layer of the image encoder")
    out = dict(traverse_util.flatten_dict(params))
    init_a = jax.nn.initializers.he_uniform()
    for i, k in enumerate(adapters):
        shape = flat[k].shape
        out[k] = init_a(jax.random.fold_in(key, i), shape) if k[-1] == LORA_A else jnp.zeros(shape)
    return lm, traverse_util.unflatten_dict(out)


def has_lora(params: Params) -> bool:
    return any(k[-1] in (LORA_A, LORA_B) for k in traverse_util.flatten_dict(params))


def merge_lora(params: Params, alpha: float) -> Params:
    """Params with adapters -> plain params: kernel + A @ B * alpha / rank, adapters removed.

    `alpha` must be the value the adapters were trained with (rank is read from A's shape)."""
    flat = traverse_util.flatten_dict(params)
    out = {k: v for k, v in flat.items() if k[-1] not in (LORA_A, LORA_B)}
    for k, a in flat.items():
        if k[-1] != LORA_A:
            continue
        kernel_key, b_key = k[:-1] + ("kernel",), k[:-1] + (LORA_B,)
        if b_key not in flat or kernel_key not in flat:
            raise ValueError(f"params: adapter {'/'.join(k)} has no matching {LORA_B} or kernel")
        b = flat[b_key]
        delta = jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32) * (alpha / a.shape[-1])
        out[kernel_key] = (jnp.asarray(flat[kernel_key], jnp.float32) + delta).astype(flat[kernel_key].dtype)
    return traverse_util.unflatten_dict(out)
