"""Fine-tuning SAM with optax: losses, simulated interactive prompts, train step, checkpoints.

Needs the `train` extra (`pip install 'sam-jax[train]'`: optax, orbax-checkpoint, qwix for LoRA).
Submodules: `losses`, `prompts`, `objective`, `step`, `lora`, `checkpoint`, `evaluate`, `data`
(folders, COCO json, embedding caches) and `synthetic` (the built-in shapes-on-photos dataset).
"""

from .checkpoint import Checkpointer
from .evaluate import single_point_iou
from .losses import HQ_LOSS, LossConfig, dice_loss, mask_iou, sam_loss, sigmoid_focal_loss, upsample_logits
from .lora import DEFAULT_TARGETS, add_lora, has_lora, lora_model, merge_lora
from .objective import decode_loss, hq_features, interactive_loss
from .prompts import (
    PromptConfig,
    mask_boxes,
    noisy_boxes,
    point_schedule,
    sample_corrective_points,
    sample_foreground_points,
)
from .step import TrainConfig, TrainState, encoder_outputs, make_optimizer, make_train_step, param_labels

__all__ = [
    "Checkpointer",
    "DEFAULT_TARGETS",
    "HQ_LOSS",
    "LossConfig",
    "PromptConfig",
    "TrainConfig",
    "TrainState",
    "add_lora",
    "decode_loss",
    "dice_loss",
    "encoder_outputs",
    "has_lora",
    "hq_features",
    "interactive_loss",
    "lora_model",
    "make_optimizer",
    "make_train_step",
    "mask_boxes",
    "mask_iou",
    "merge_lora",
    "noisy_boxes",
    "param_labels",
    "point_schedule",
    "sam_loss",
    "sample_corrective_points",
    "sample_foreground_points",
    "sigmoid_focal_loss",
    "single_point_iou",
    "upsample_logits",
]
