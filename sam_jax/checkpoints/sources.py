"""Any supported checkpoint -> params: `sam_jax.load`, and `load_source` behind `python -m convert`.

The layout is told by the file: a folder is Hugging Face's; a safetensors file (named
`.safetensors`, or any name whose content begins as one) is sam_jax's when its metadata says so
and otherwise official or Hugging Face by its key names; anything else an official `.pth` (the only
case that needs torch).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp

from ..build import Params, build_sam
from ..config import SamConfig, get_config
from ..modeling import Sam
from . import named, native
from .errors import ConversionError
from .hf import convert_hf_state_dict, is_hf_layout, load_hf, read_safetensors
from .official import convert_state_dict, describe, read_pth


def load_source(src: str, model_type: Any = "auto") -> Tuple[SamConfig, Dict[str, Any]]:
    """Any supported SRC -> (SamConfig, nested params). Raises ConversionError, also for a sam_jax
    file of quantized weights (`sam_jax.quantize`): what reads SRC here converts float weights.

    `model_type` ("auto", a preset name or a SamConfig) is checked against what SRC holds. A name
    (`vit_b`, a Hugging Face id) is fetched into the weights cache first (`named`).
    """
    from ..quantize import quantization_of  # qwix itself is not imported

    model, config, params = _read(src, model_type)
    if model is not None and quantization_of(model) is not None:
        mode = quantization_of(model)["mode"]
        raise ConversionError(f"{src}: holds quantized weights ({mode}); only float weights convert")
    return config, params


def _read(src: str, model_type: Any) -> Tuple[Optional[Sam], SamConfig, Dict[str, Any]]:
    """`load_source`'s reading: (the file's model for a sam_jax file, else None; config; params).
    The model of a sam_jax file is the quantized one when the file holds quantized weights."""
    try:
        _check_model_type(model_type)
        src = resolve(src)
    except (ValueError, TypeError) as e:
        raise ConversionError(str(e)) from None
    if os.path.isdir(src):
        return (None, *load_hf(src, model_type))
    if not os.path.isfile(src):
        raise ConversionError(f"{src}: no such file or folder ({named.describe_known()})")
    if src.endswith(".safetensors") or native.is_safetensors(src):  # the content tells, whatever the name
        try:
            meta = native.metadata(src)
            own = native.read(src, meta) if meta.get("format") == native.FORMAT else None
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if own is not None:
            config = own[0].config
            if model_type not in (None, "auto") and get_config(model_type) != config:
                name = model_type if isinstance(model_type, str) else "given"
                raise ConversionError(
                    f"{src}: model type {name} does not match the file, which holds {describe(config)}"
                )
            return own[0], config, own[1]
        state = read_safetensors(src)[0]
    else:
        state = read_pth(src)
    convert = convert_hf_state_dict if is_hf_layout(state) else convert_state_dict
    return (None, *convert(state, model_type))


def _check_model_type(model_type: Any) -> None:
    """ValueError / TypeError for a model_type that is neither "auto" nor a model (before any
    file is read: a typo must not pass for "auto")."""
    if model_type is not None and model_type != "auto":
        get_config(model_type)


def resolve(path_or_name: str | os.PathLike, *, progress: bool = True, timeout: float | None = None) -> str:
    """A path to read: PATH itself when it exists or is not a name; else the converted file of
    the name in the weights cache, fetched first when it is not there yet."""
    path = os.fspath(path_or_name)
    if os.path.exists(path) or not named.is_name(path):
        return path
    target = named.cached_path(path)
    if os.path.isfile(target):  # the common case: no lock, no network, no downloader imported
        return target
    return fetch(path, progress=progress, timeout=timeout)


def fetch(name: str, *, progress: bool = True, timeout: float | None = None, force: bool = False) -> str:
    """Downloads, checks and converts NAME (a registry name or a Hugging Face id) into the weights
    cache, unless it is there and `force` is False; returns the converted file's path. Raises
    ValueError for an unknown name or a checkpoint that does not convert, `named.DownloadError`
    (an OSError) for the network and the disk."""
    target = named.cached_path(name)  # ValueError for an unknown name
    with named.lock(name):
        if os.path.isfile(target) and not force:
            return target  # another process fetched it while this one waited
        raw, model_type, source = named.download(name, progress=progress, timeout=timeout)
        try:
            config, params = load_source(raw, model_type)
        except ConversionError as e:
            raise ValueError(f"{name}: the downloaded checkpoint does not convert: {e}") from None
        try:
            native.save(target, params, config, source=source)
        except OSError as e:
            raise named.DownloadError(f"{name}: cannot write {target}: {e.strerror or e}") from None
        named.discard_download(name)
    return target


def load(path: str | os.PathLike, model_type: Any = "auto") -> Tuple[Sam, Params]:
    """Loads `(model, params)` from any checkpoint `python -m convert` reads, or by name.

    - a name: `vit_b`, `vit_l`, `vit_h` (Meta's checkpoints), or a Hugging Face SAM repository id
      such as `facebook/sam-vit-base`: downloaded, checked and converted on first use, then read
      from the weights cache (`sam-jax weights list`; `sam_jax.checkpoints.named`). A path that
      exists always means that file;
    - a sam_jax `.safetensors` (what `python -m convert` and `sam_jax.save` write): read as is;
    - an official `.pth` such as `sam_vit_b_01ec64.pth` (needs torch);
    - a Hugging Face `facebook/sam-vit-*` folder (`config.json` + `model.safetensors`), or a
      `.safetensors` file holding official or Hugging Face tensor names (no torch needed).

    Checkpoints other than sam_jax's are converted in memory on every call; convert once with
    `python -m convert` to load faster. `model_type` ("vit_b", ...) is checked against the model
    the weights hold ("auto": whatever they hold, detected from the tensor shapes where the file
    does not record it). Raises FileNotFoundError for a missing path, ValueError (one line naming
    the file, or a short list of every problem found) for weights that do not load or an unknown
    model type, TypeError for a model_type that is neither a name nor a SamConfig.
    """
    _check_model_type(model_type)
    path = resolve(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such weights file or folder: {path} ({named.describe_known()})")
    try:
        model, config, params = _read(path, model_type)
    except ConversionError as e:
        message = str(e)
        raise ValueError(message if message.startswith(path) else f"{path}: {message}") from None
    # A sam_jax file's own model: the quantized one (`sam_jax.quantize`) for quantized weights.
    return model if model is not None else build_sam(config), jax.tree_util.tree_map(jnp.asarray, params)
