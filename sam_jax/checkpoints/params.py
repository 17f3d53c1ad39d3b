"""Params trees as flat {path: array} dicts, and the strict check of a tree against a model."""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np
from flax import traverse_util

from ..build import Params, param_shapes
from ..config import SamConfig, preset_name
from ..modeling import Sam
from .errors import printable

SEP = "/"


def flatten_params(params: Params) -> Dict[str, Any]:
    """Nested params -> {"image_encoder/blocks_0/attn/qkv/kernel": array, ...}."""
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten_params(flat: Dict[str, Any]) -> Params:
    return traverse_util.unflatten_dict(flat, sep=SEP)


# The fields that count blocks or layers: the model's init is traced once per block (about 30 ms
# each on a CPU), so a depth read from a file is checked against the file before a model is built.
# A TinyViT encoder's blocks (`tiny_vit_depths`, summed) count as its encoder_depth.
DEPTHS = ("encoder_depth", "decoder_depth", "iou_head_depth", "num_multimask_outputs")


def check_depths(config: SamConfig, n_tensors: int) -> None:
    """Raises ValueError when `config` has more blocks or layers than a file of `n_tensors`
    tensors can hold (each has tensors of its own): no such file fits it, and building the model
    to find out would take hours for a depth of a million."""
    depths = {name: getattr(config, name) for name in DEPTHS}
    if config.encoder_type == "tiny_vit":
        depths["encoder_depth"] = sum(config.tiny_vit_depths)
    deep = [f"{name} {d}" for name, d in depths.items() if d > n_tensors]
    if deep:
        raise ValueError(f"{', '.join(deep)}: more blocks than the {n_tensors} tensors of the checkpoint")


def check_params(params: Params, model: Sam, source: str = "params") -> None:
    """Raises ValueError listing every missing, unexpected or mis-shaped parameter."""
    check_flat_params(flatten_params(params), model, source)


def check_flat_params(have: Mapping[str, Any], model: Sam, source: str = "params") -> None:
    """`check_params` of a flat {path: array} dict, before it is unflattened (names such as "a"
    beside "a/b" would not make a tree)."""
    want = flatten_params(param_shapes(model))
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {printable(k)}" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k}: shape {tuple(np.shape(have[k]))}, expected {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(have))
        if tuple(np.shape(have[k])) != tuple(want[k].shape)
    ]
    if problems:
        head = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        model_name = preset_name(model.config)
        raise ValueError(f"{source} do not fit the {model_name + ' ' if model_name else ''}model: {head}")
