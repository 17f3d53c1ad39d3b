"""Params trees as flat {path: array} dicts, and the strict check of a tree against a model."""

from __future__ import annotations

from typing import Any, Dict

import numpy as np
from flax import traverse_util

from ..build import Params, param_shapes
from ..modeling import Sam

SEP = "/"


def flatten_params(params: Params) -> Dict[str, Any]:
    """Nested params -> {"image_encoder/blocks_0/attn/qkv/kernel": array, ...}."""
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten_params(flat: Dict[str, Any]) -> Params:
    return traverse_util.unflatten_dict(flat, sep=SEP)


def check_params(params: Params, model: Sam, source: str = "params") -> None:
    """Raises ValueError listing every missing, unexpected or mis-shaped parameter."""
    want = flatten_params(param_shapes(model))
    have = flatten_params(params)
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [
        f"{k}: shape {tuple(np.shape(have[k]))}, expected {tuple(want[k].shape)}"
        for k in sorted(set(want) & set(have))
        if tuple(np.shape(have[k])) != tuple(want[k].shape)
    ]
    if problems:
        head = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ValueError(f"{source} do not fit the model: {head}")
