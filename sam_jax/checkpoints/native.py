"""The sam_jax checkpoint: one `.safetensors` file of the flattened params tree, whose metadata
records the format version, the model type and the full config (`sam_jax.save` writes it)."""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .._atomic import atomic_file
from ..build import Params, build_sam
from ..config import SamConfig, get_config, preset_name
from ..modeling import Sam
from .params import check_params, flatten_params, unflatten_params

FORMAT = "sam_jax"
FORMAT_VERSION = "1"


def write_safetensors(path: str | os.PathLike, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Writes a safetensors file atomically (`atomic_file`: never half-written under the final
    name, with the permissions the umask gives new files)."""
    from safetensors.numpy import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save(path: str | os.PathLike, params: Params, config: SamConfig | str) -> None:
    """Writes params as one safetensors file; metadata records the model type and full config."""
    config = get_config(config)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": preset_name(config) or "custom",
        "config": config.to_json(),
    }
    write_safetensors(path, flat, meta)


def read(path: str, meta: Dict[str, str]) -> Tuple[Sam, Params]:
    """(model, params) of a sam_jax file, given its header metadata (`metadata`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(this sam_jax reads {FORMAT_VERSION})"
        )
    config = SamConfig.from_dict(json.loads(meta["config"]))
    model = build_sam(config)
    params = jax.tree_util.tree_map(jnp.asarray, unflatten_params(flat))
    check_params(params, model, path)
    return model, params


def metadata(path: str) -> Dict[str, str]:
    """The header metadata of a safetensors file (read without loading its tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
