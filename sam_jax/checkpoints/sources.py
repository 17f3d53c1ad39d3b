"""Any supported checkpoint -> params: `sam_jax.load`, and `load_source` behind `python -m convert`.

The layout is told by the file: a folder is Hugging Face's, a `.safetensors` file is sam_jax's when
its metadata says so and otherwise official or Hugging Face by its key names, anything else an
official `.pth` (the only case that needs torch).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp

from ..build import Params, build_sam
from ..config import SamConfig, get_config
from ..modeling import Sam
from . import native
from .errors import ConversionError
from .hf import convert_hf_state_dict, is_hf_layout, load_hf, read_safetensors
from .official import convert_state_dict, read_pth


def load_source(src: str, model_type: Any = "auto") -> Tuple[SamConfig, Dict[str, Any]]:
    """Any supported SRC -> (SamConfig, nested params). Raises ConversionError.

    `model_type` ("auto", a preset name or a SamConfig) is checked against what SRC holds.
    """
    if os.path.isdir(src):
        return load_hf(src, model_type)
    if not os.path.isfile(src):
        raise ConversionError(f"{src}: no such file or folder")
    if src.endswith(".safetensors"):
        try:
            meta = native.metadata(src)
            own = native.read(src, meta) if meta.get("format") == native.FORMAT else None
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if own is not None:
            model, params = own
            if model_type != "auto" and get_config(model_type) != model.config:
                raise ConversionError(f"{src}: holds a model other than --model-type {model_type}")
            return model.config, params
        state = read_safetensors(src)[0]
    else:
        state = read_pth(src)
    convert = convert_hf_state_dict if is_hf_layout(state) else convert_state_dict
    return convert(state, model_type)


def load(path: str | os.PathLike, model_type: Any = "auto") -> Tuple[Sam, Params]:
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
        meta = native.metadata(path)
        if meta.get("format") == native.FORMAT:
            return native.read(path, meta)
    try:
        config, params = load_source(path, model_type)
    except ConversionError as e:
        raise ValueError(f"{path}: {e}") from None
    return build_sam(config), jax.tree_util.tree_map(jnp.asarray, params)
