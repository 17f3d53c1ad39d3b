"""Train state, optimizer parameter groups and the jit-compiled train step (optax).

Methods are named by string (`method="encode_image"`): a LoRA model (`lora.add_lora`) intercepts
the method it finds by name on its own class; `method=Sam.encode_image` would bypass the adapters.

Parameter groups (`param_labels`): "train" leaves get the optimizer; "frozen" leaves get
`optax.set_to_zero()`, which holds no state, and are passed through the step untouched (bitwise).
  * encoder="frozen" (default): the image encoder is frozen and never differentiated: embeddings
    come from the batch (cached) or from a forward pass outside the gradient;
  * encoder="full": everything is trained;
  * encoder="lora": only the LoRA adapters of the encoder (see `lora.add_lora`) are trained;
  * decoder="full" (default): the prompt encoder and the whole mask decoder are trained (SAM);
  * decoder="hq": SAM-HQ, the HQ-SAM paper's recipe: every SAM weight stays frozen and only the
    parts SAM-HQ adds to the mask decoder train (`HQ_PARTS`: hf_token, hf_mlp, compress_vit_feat,
    embedding_encoder, embedding_maskfeature), on the loss of the HQ mask alone
    (`hq_token_only`, see `objective.interactive_loss`). The encoder must be frozen.
The recipe is a field of `TrainConfig`, not read off the params: SAM-HQ params with the default
decoder="full" raise instead of silently training something other than asked for, and a saved
config says what was trained. (Training SAM-HQ's whole decoder is not a recipe anyone has
published: its one output mask is SAM's best plus the HQ mask, with SAM's IoU.)
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
from ..modeling.mask_decoder import HQ_PARTS
from .losses import LossConfig
from .lora import LORA_A, LORA_B
from .objective import hq_features, interactive_loss
from .prompts import PromptConfig

Params = Dict[str, Any]
Batch = Dict[str, jax.Array]
ENCODER_MODES = ("frozen", "full", "lora")
DECODER_MODES = ("full", "hq")
# The mask decoder's submodules that SAM-HQ adds to SAM's (Flax names: Sequential members are
# `<name>_<index>`); decoder="hq" trains these and nothing else.
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
      decoder (str): "full" or "hq" (SAM-HQ's parts only; needs encoder="frozen" and a loss
        without the IoU term, whose prediction is SAM's and not the HQ mask's: `losses.HQ_LOSS`
        is the paper's BCE + dice).
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
    decoder: str = "full"
    loss: LossConfig = LossConfig()
    prompts: PromptConfig = PromptConfig()
    remat_rounds: bool = False

    def __post_init__(self) -> None:
        if self.encoder not in ENCODER_MODES:
            raise ValueError(f"encoder must be one of {ENCODER_MODES}, got {self.encoder!r}")
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.decoder == "hq" and self.encoder != "frozen":
            raise ValueError(
                f"decoder='hq' trains SAM-HQ's parts alone: encoder must be 'frozen', got {self.encoder!r}"
            )
        if self.decoder == "hq" and self.loss.iou_weight != 0:
            raise ValueError(
                "decoder='hq': the HQ mask has no IoU prediction to train (the IoU is SAM's); "
                f"use a loss with iou_weight=0, e.g. train.HQ_LOSS, got iou_weight={self.loss.iou_weight}"
            )


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params: the full tree (frozen leaves included); opt_state: optax state."""

    step: jax.Array
    params: Params
    opt_state: Any

    @classmethod
    def create(cls, params: Params, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.int32(0), params=params, opt_state=tx.init(params))


def _is_hq_part(k: Tuple[str, ...]) -> bool:
    """Whether flattened key k is a leaf of SAM-HQ's added decoder parts (`HQ_PARTS`)."""
    return len(k) > 1 and k[0] == "mask_decoder" and any(k[1] == n or k[1].startswith(n + "_") for n in HQ_PARTS)


def param_labels(params: Params, encoder: str = "frozen", decoder: str = "full") -> Params:
    """A tree like params with "train" or "frozen" at each leaf (see the module docstring).

    ValueError for an unknown mode, LoRA adapters without encoder="lora" (or the reverse),
    decoder="hq" on params without SAM-HQ's parts or with an encoder that is not frozen, and
    SAM-HQ params with decoder="full"."""
    if encoder not in ENCODER_MODES:
        raise ValueError(f"encoder must be one of {ENCODER_MODES}, got {encoder!r}")
    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder must be one of {DECODER_MODES}, got {decoder!r}")
    flat = traverse_util.flatten_dict(params)
    lora_leaves = [k for k in flat if k[-1] in (LORA_A, LORA_B)]
    if encoder == "lora" and not lora_leaves:
        raise ValueError("encoder='lora' but params hold no LoRA adapters: use train.add_lora first")
    if encoder != "lora" and lora_leaves:
        raise ValueError(
            f"params hold LoRA adapters but encoder={encoder!r}; use encoder='lora' or merge them with train.merge_lora"
        )
    has_hq = any(_is_hq_part(k) for k in flat)
    if decoder == "hq" and not has_hq:
        raise ValueError(
            "decoder='hq' but params hold no SAM-HQ parts (mask_decoder/hf_token, ...): not a SAM-HQ model"
        )
    if decoder == "hq" and encoder != "frozen":
        raise ValueError(f"decoder='hq' trains SAM-HQ's parts alone: encoder must be 'frozen', got {encoder!r}")
    if decoder == "full" and has_hq:
        raise ValueError(
            "params are SAM-HQ's: use decoder='hq' (the HQ-SAM recipe: only the HQ parts train, "
            "on the HQ mask); training its whole decoder is not supported"
        )

    def label(k) -> str:
        if k in ALWAYS_FROZEN or k[-1] in ALWAYS_FROZEN_LEAVES:
            return "frozen"
        if decoder == "hq":
            return "train" if _is_hq_part(k) else "frozen"
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
    return optax.multi_transform(
        {"train": train, "frozen": optax.set_to_zero()}, param_labels(params, config.encoder, config.decoder)
    )


def encoder_outputs(model: Sam, params: Params, images: jax.Array) -> Dict[str, jax.Array]:
    """What a step with a frozen encoder reads of the images, as batch entries to cache
    (`data.cache_embeddings`): (B, S, S, 3) preprocessed NHWC images -> {"embeddings": (B, h, w,
    C)}, and for SAM-HQ also {"interm_embeddings": (B, h, w, encoder width)}, the ViT tokens after
    its first global block (SAM-HQ's HQ features are computed from both by trainable layers, so
    they are not cached themselves). NHWC float32."""
    if model.config.hq:
        emb, interm = model.apply({"params": params}, images, method="encode_image_interm")
        return {"embeddings": emb, "interm_embeddings": interm}
    return {"embeddings": model.apply({"params": params}, images, method="encode_image")}


def make_train_step(
    model: Sam, tx: optax.GradientTransformation, config: TrainConfig, donate: bool = False
) -> Callable[[TrainState, Batch, jax.Array], Tuple[TrainState, Dict[str, jax.Array]]]:
    """Returns a jitted `(state, batch, key) -> (state, metrics)`.

    `donate=True` lets XLA reuse the input state's buffers for the output (about half the memory
    for full fine-tuning); the state passed in, and every array it shares, is then invalid.

    batch:
      "masks": (B, K, S, S) bool, K ground-truth masks per image in the model-input frame;
      and either "embeddings": (B, h, w, C) NHWC cached image embeddings (encoder="frozen" only;
      decoder="hq" also needs their "interm_embeddings", see `encoder_outputs`)
      or "images": (B, S, S, 3) NHWC normalised, padded encoder inputs (`sam_jax.transforms`).
    key: PRNG key of this step (prompt simulation); the step is a deterministic function of
      (state, batch, key). metrics: scalars ("loss", "iou_first", "iou_last", "grad_norm", ...).
    """
    hq = config.decoder == "hq"

    def step(state: TrainState, batch: Batch, key: jax.Array):
        if "masks" not in batch or ("images" in batch) == ("embeddings" in batch):
            raise ValueError("batch must hold 'masks' and exactly one of 'images' or 'embeddings'")
        if "embeddings" in batch and hq != ("interm_embeddings" in batch):
            raise ValueError(
                "decoder='hq' needs batch['interm_embeddings'] with batch['embeddings'] (train.encoder_outputs)"
                if hq
                else "batch['interm_embeddings'] is SAM-HQ's (decoder='hq')"
            )
        masks = batch["masks"]
        if masks.ndim != 4:
            raise ValueError(f"batch['masks'] must be (B, K, S, S), got shape {masks.shape}")
        b, k, s = masks.shape[0], masks.shape[1], masks.shape[-1]
        gt = masks.reshape(b * k, s, s)
        flat = traverse_util.flatten_dict(state.params)
        labels = traverse_util.flatten_dict(param_labels(state.params, config.encoder, config.decoder))
        train = {n: v for n, v in flat.items() if labels[n] == "train"}
        frozen = {n: v for n, v in flat.items() if labels[n] == "frozen"}
        encode_in_grad = config.encoder != "frozen"
        if "embeddings" in batch:
            if encode_in_grad:
                raise ValueError(
                    f"cached embeddings cannot train the encoder (encoder={config.encoder!r}); pass batch['images']"
                )
            enc = {n: batch[n] for n in ("embeddings", "interm_embeddings") if n in batch}
        elif not encode_in_grad:  # frozen encoder: forward only, outside the gradient
            enc = jax.lax.stop_gradient(encoder_outputs(model, state.params, batch["images"]))

        def loss_fn(train_params):
            params = traverse_util.unflatten_dict({**frozen, **train_params})
            if encode_in_grad:
                enc_ = {"embeddings": model.apply({"params": params}, batch["images"], method="encode_image")}
            else:
                enc_ = enc
            e = jnp.repeat(enc_["embeddings"], k, axis=0)  # one embedding per ground-truth mask
            per_mask_hq = None
            if hq:  # from trainable layers: inside the gradient, once per image
                feats = hq_features(model, params, enc_["embeddings"], enc_["interm_embeddings"])
                per_mask_hq = jnp.repeat(feats, k, axis=0)
            return interactive_loss(
                model, params, e, gt, key, config.prompts, config.loss, config.remat_rounds, per_mask_hq
            )

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
