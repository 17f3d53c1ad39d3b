"""Train state, optimizer parameter groups and the jit-compiled train step (optax).

Methods are named by string (`method="encode_image"`): a LoRA model (`lora.add_lora`) intercepts
the method it finds by name on its own class; `method=Sam.encode_image` would bypass the adapters.

Parameter groups (`param_labels`): "train" leaves get the optimizer; "frozen" leaves get
`optax.set_to_zero()`, which holds no state, and are passed through the step untouched (bitwise).
  * encoder="frozen" (default): the image encoder is frozen and never differentiated: embeddings
    come from the batch (cached) or from a forward pass outside the gradient;
  * encoder="full": everything is trained;
  * encoder="lora": only the LoRA adapters of the encoder (see `lora.add_lora`) are trained.
The prompt encoder's random-Fourier matrix and the BatchNorm statistics of MobileSAM's TinyViT
are always frozen: they are buffers, not parameters, in the official models (the statistics are
used as they are, in inference form, whatever the encoder mode).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from ..modeling import Sam
from .losses import LossConfig
from .lora import LORA_A, LORA_B
from .objective import interactive_loss
from .prompts import PromptConfig

Params = Dict[str, Any]
Batch = Dict[str, jax.Array]
ENCODER_MODES = ("frozen", "full", "lora")
ALWAYS_FROZEN = (("prompt_encoder", "pe_layer", "positional_encoding_gaussian_matrix"),)
# Leaves frozen wherever they are: BatchNorm's running statistics (MobileSAM's TinyViT), buffers
# in the official model that inference reads and no gradient step may move.
ALWAYS_FROZEN_LEAVES = ("running_mean", "running_var")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Args:
      learning_rate (float): peak AdamW learning rate.
      weight_decay (float): AdamW decoupled weight decay, applied to kernels/embeddings (ndim >= 2).
      warmup_steps (int): linear warm-up from 0.
      decay_steps (int): if > 0, cosine decay to 0 at this step; else constant after warm-up.
      grad_clip_norm (float | None): clip trainable gradients to this global norm.
      encoder (str): "frozen", "full" or "lora" (see the module docstring).
      loss (LossConfig), prompts (PromptConfig): the objective.
      remat_rounds (bool): recompute the decoder pass of each interactive round after the first in
        the backward pass (`objective.interactive_loss`): same gradient, far less memory for the
        paper's 11-round episodes at full size, at the cost of a second decoder forward pass.
    """

    learning_rate: float = 1e-4
    weight_decay: float = 0.1
    warmup_steps: int = 0
    decay_steps: int = 0
    grad_clip_norm: Optional[float] = 1.0
    encoder: str = "frozen"
    loss: LossConfig = LossConfig()
    prompts: PromptConfig = PromptConfig()
    remat_rounds: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder must be one of {ENCODER_MODES}, got {self.encoder!r}")


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the full tree (frozen leaves included); opt_state: optax state."""

    step: jax.Array
    params: Params
    opt_state: Any

    @classmethod
    def create(cls, params: Params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.int32(0), params=params, opt_state=tx.init(params))


def param_labels(params: Params, encoder: str = "frozen") -> Params:
    """A tree like params with "train" or "frozen" at each leaf (see the module docstring)."""
    if encoder not in ENCODER_MODES:
        raise ValueError(f"encoder must be one of {ENCODER_MODES}, got {encoder!r}")
    flat = traverse_util.flatten_dict(params)
    lora_leaves = [k for k in flat if k[-1] in (LORA_A, LORA_B)]
    if encoder == "lora" and not lora_leaves:
        raise ValueError("encoder='lora' but params hold no LoRA adapters: use train.add_lora first")
    if encoder != "lora" and lora_leaves:
        raise ValueError(
            f"params hold LoRA adapters but encoder={encoder!r}; use encoder='lora' or merge them with train.merge_lora"
        )

    def label(k) -> str:
        if k in ALWAYS_FROZEN or k[-1] in ALWAYS_FROZEN_LEAVES:
            return "frozen"
        if k[0] != "image_encoder" or encoder == "full":
            return "train"
        return "train" if encoder == "lora" and k[-1] in (LORA_A, LORA_B) else "frozen"

    return traverse_util.unflatten_dict({k: label(k) for k in flat})


def make_optimizer(config: TrainConfig, params: Params) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping, warm-up / cosine schedule) on the "train" group and
    `optax.set_to_zero()` on the "frozen" group, via `optax.multi_transform`."""
    lr: Any = config.learning_rate
    if config.warmup_steps or config.decay_steps:
        if config.decay_steps:
            lr = optax.warmup_cosine_decay_schedule(
                0.0, config.learning_rate, config.warmup_steps, max(config.decay_steps, config.warmup_steps + 1)
            )
        else:
            lr = optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps)
    decay_mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)  # noqa: E731
    train = optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=config.weight_decay, mask=decay_mask)
    if config.grad_clip_norm:
        train = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), train)
    return optax.multi_transform({"train": train, "frozen": optax.set_to_zero()}, param_labels(params, config.encoder))


def make_train_step(
    model: Sam, tx: optax.GradientTransformation, config: TrainConfig, donate: bool = False
) -> Callable[[TrainState, Batch, jax.Array], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Returns a jitted `(state, batch, key) -> (state, metrics)`.

    `donate=True` lets XLA reuse the input state's buffers for the output (about half the memory
    for full fine-tuning); the state passed in, and every array it shares, is then invalid.

    batch:
      "masks": (B, K, S, S) bool, K ground-truth masks per image in the model-input frame;
      and either "embeddings": (B, h, w, C) NHWC cached image embeddings (encoder="frozen" only)
      or "images": (B, S, S, 3) NHWC normalised, padded encoder inputs (`sam_jax.transforms`).
    key: PRNG key of this step (prompt simulation); the step is a deterministic function of
      (state, batch, key). metrics: scalars ("loss", "iou_first", "iou_last", "grad_norm", ...).
    """

    def step(state: TrainState, batch: Batch, key: jax.Array):
        if "masks" not in batch or ("images" in batch) == ("embeddings" in batch):
            raise ValueError("batch must hold 'masks' and exactly one of 'images' or 'embeddings'")
        masks = batch["masks"]
        if masks.ndim != 4:
            raise ValueError(f"batch['masks'] must be (B, K, S, S), got shape {masks.shape}")
        b, k, s = masks.shape[0], masks.shape[1], masks.shape[-1]
        gt = masks.reshape(b * k, s, s)
        flat = traverse_util.flatten_dict(state.params)
        labels = traverse_util.flatten_dict(param_labels(state.params, config.encoder))
        train = {n: v for n, v in flat.items() if labels[n] == "train"}
        frozen = {n: v for n, v in flat.items() if labels[n] == "frozen"}
        encode_in_grad = config.encoder != "frozen"
        if "embeddings" in batch:
            if encode_in_grad:
                raise ValueError(
                    f"cached embeddings cannot train the encoder (encoder={config.encoder!r}); pass batch['images']"
                )
            emb = batch["embeddings"]
        elif not encode_in_grad:  # frozen encoder: forward only, outside the gradient
            emb = jax.lax.stop_gradient(model.apply({"params": state.params}, batch["images"], method="encode_image"))

        def loss_fn(train_params):
            params = traverse_util.unflatten_dict({**frozen, **train_params})
            e = model.apply({"params": params}, batch["images"], method="encode_image") if encode_in_grad else emb
            e = jnp.repeat(e, k, axis=0)  # one embedding per ground-truth mask
            return interactive_loss(model, params, e, gt, key, config.prompts, config.loss, config.remat_rounds)

        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(train)
        # Frozen leaves need a placeholder in the update tree; set_to_zero ignores it and the
        # result is never used, so XLA drops both: no memory, no compute.
        full = traverse_util.unflatten_dict({**{n: jnp.zeros_like(v) for n, v in frozen.items()}, **grads})
        updates, opt_state = tx.update(full, state.opt_state, state.params)
        upd = traverse_util.flatten_dict(updates)
        new = {n: optax.apply_updates(v, upd[n]) if labels[n] == "train" else v for n, v in flat.items()}
        sq = sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(grads))
        metrics = {**metrics, "grad_norm": jnp.sqrt(sq)}
        new_state = TrainState(step=state.step + 1, params=traverse_util.unflatten_dict(new), opt_state=opt_state)
        return new_state, metrics

    return jax.jit(step, donate_argnums=(0,) if donate else ())
