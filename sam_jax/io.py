"""Saving and loading converted weights (`.safetensors`); loading official `.pth` files and Hugging
Face checkpoints through the converter."""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .build import Params, build_sam, param_shapes
from .config import SamConfig, get_config, preset_name
from .modeling import Sam

FORMAT = "sam_jax"
FORMAT_VERSION = "1"
SEP = "/"


def flatten_params(params: Params) -> Dict[str, Any]:
    """Nested params -> {"image_encoder/blocks_0/attn/qkv/kernel": array, ...}."""
    return traverse_util.flatten_dict(params, sep=SEP)


def unflatten_params(flat: Dict[str, Any]) -> Params:
    return traverse_util.unflatten_dict(flat, sep=SEP)


def write_safetensors(path: str | os.PathLike, tensors: Dict[str, np.ndarray],
                      metadata: Dict[str, str]) -> None:
    """Writes a safetensors file atomically (never half-written under the final name), with the
    permissions the umask gives new files (safetensors itself creates them 0600)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def save(path: str | os.PathLike, params: Params, config: SamConfig | str) -> None:
    """Writes params as one safetensors file; metadata records the model type and full config."""
    config = get_config(config)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flatten_params(params).items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "model_type": preset_name(config) or "custom", "config": config.to_json()}
    write_safetensors(path, flat, meta)


def check_params(params: Params, model: Sam, source: str = "params") -> None:
    """Raises ValueError listing every missing, unexpected or mis-shaped parameter."""
    want = flatten_params(param_shapes(model))
    have = flatten_params(params)
    problems = [f"missing {k} {tuple(want[k].shape)}" for k in sorted(set(want) - set(have))]
    problems += [f"unexpected {k}" for k in sorted(set(have) - set(want))]
    problems += [f"{k}: shape {tuple(np.shape(have[k]))}, expected {tuple(want[k].shape)}"
                 for k in sorted(set(want) & set(have)) if tuple(np.shape(have[k])) != tuple(want[k].shape)]
    if problems:
        head = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
        raise ValueError(f"{source} do not fit the model: {head}")


def _load_safetensors(path: str, meta: Dict[str, str]) -> Tuple[Sam, Params]:
    """A sam_jax file, given its header metadata (`_safetensors_metadata`)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format version {meta.get('format_version')!r} is not supported "
                         f"(this sam_jax reads {FORMAT_VERSION})")
    config = SamConfig.from_dict(json.loads(meta["config"]))
    model = build_sam(config)
    params = jax.tree_util.tree_map(jnp.asarray, unflatten_params(flat))
    check_params(params, model, path)
    return model, params


def load(path: str | os.PathLike, model_type: str = "auto") -> Tuple[Sam, Params]:
    """Loads `(model, params)` from any checkpoint `python -m convert` reads.

    - a sam_jax `.safetensors` (what `python -m convert` and `sam_jax.save` write): read as is;
    - an official `.pth` such as `sam_vit_b_01ec64.pth` (needs torch);
    - a Hugging Face `facebook/sam-vit-*` folder (`config.json` + `model.safetensors`), or a
      `.safetensors` file holding official or Hugging Face tensor names (no torch needed).

    Checkpoints other than sam_jax's are converted in memory on every call; convert once with
    `python -m convert` to load faster. `model_type` ("vit_b", ...) checks a converted checkpoint's
    model ("auto" detects it from the tensor shapes); it does not apply to sam_jax files.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file or folder: {path}")
    if os.path.isfile(path) and path.endswith(".safetensors"):
        meta = _safetensors_metadata(path)
        if meta.get("format") == FORMAT:
            return _load_safetensors(path, meta)
    from convert.__main__ import load_source  # torch is needed for .pth / .bin files only
    from convert.errors import ConversionError

    try:
        config, params = load_source(path, model_type)
    except ConversionError as e:
        raise ValueError(f"{path}: {e}") from None
    return build_sam(config), jax.tree_util.tree_map(jnp.asarray, params)


def _safetensors_metadata(path: str) -> Dict[str, str]:
    """The header metadata of a safetensors file (read without loading its tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
