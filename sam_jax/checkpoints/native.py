"""The sam_jax checkpoint: one `.safetensors` file of the flattened params tree, whose metadata
records the format version, the model type and the full config (`sam_jax.save` writes it)."""

from __future__ import annotations

import json
import os
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from .._atomic import atomic_file
from ..build import Params, build_sam
from ..config import SamConfig, get_config, preset_name
from ..modeling import Sam
from .errors import first_line, printable
from .params import check_depths, check_flat_params, check_params, flatten_params, unflatten_params

FORMAT = "sam_jax"
FORMAT_VERSION = "1"


def write_safetensors(path: str | os.PathLike, tensors: Dict[str, np.ndarray], metadata: Dict[str, str]) -> None:
    """Writes a safetensors file atomically (`atomic_file`: never half-written under the final
    name, with the permissions the umask gives new files)."""
    from safetensors.numpy import save_file

    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def save(path: str | os.PathLike, params: Params, config: SamConfig | str | Sam, *, source: str | None = None) -> None:
    """Writes params as one safetensors file; metadata records the model type and full config (and
    `source`, where the weights came from, when given). Quantized params (`sam_jax.quantize`) are
    saved with their model as `config`: int8 kernels and float32 scales, the metadata's
    "quantization" records the mode and layers, and `load` returns the quantized model (no torch
    needed). Every file `save` writes loads: params that are not a params tree (TypeError) or do
    not fit the config's model (ValueError, naming the keys) are refused before anything is
    written, and a PATH that cannot be written (a folder, a folder that does not exist: OSError)
    leaves nothing behind, not even a temporary."""
    from ..quantize import from_tensors, is_quantized, quantization_of, to_tensors  # qwix: when quantized

    quantization = quantization_of(config)  # a quantized model passed as `config`
    if isinstance(config, Sam):
        config = config.config
    config = get_config(config)
    if not isinstance(params, Mapping):
        raise TypeError(
            f"params must be the nested dict of arrays that load and init_params return, got {params!r:.60}"
        )
    if is_quantized(params=params):
        if quantization is None:
            raise ValueError("params are quantized: pass the quantized model as config, save(path, qparams, qmodel)")
        tensors = to_tensors(params)
        from_tensors(build_sam(config), tensors, quantization)  # refuses params that do not fit
    else:
        check_params(params, build_sam(config), "params")
        tensors = flatten_params(params)
    flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in tensors.items()}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": preset_name(config) or "custom",
        "config": config.to_json(),
    }
    if is_quantized(params=params):
        meta["quantization"] = json.dumps(quantization)
    if source is not None:
        meta["source"] = source
    write_safetensors(path, flat, meta)


def read(path: str, meta: Dict[str, str]) -> Tuple[Sam, Params]:
    """(model, params) of a sam_jax file, given its header metadata (`metadata`). Raises ValueError,
    one line naming the file and the metadata key or tensor at fault, for a file this version
    cannot read: the config is checked before any tensor is loaded, the tensors against it before
    a model is built."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {meta.get('format_version')!r} is not supported "
            f"(this sam_jax reads {FORMAT_VERSION})"
        )
    config = _config(path, meta)
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # TypeError: a dtype numpy lacks
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    if "quantization" in meta:  # int8 kernels: `quantize.from_tensors` checks every tensor
        from ..quantize import from_tensors

        try:
            quantization = json.loads(meta["quantization"])
            check_depths(config, len(flat))
            return from_tensors(build_sam(config), flat, quantization)
        except ValueError as e:
            raise ValueError(f"{path}: {first_line(e)}") from None
    not_float = sorted(k for k, v in flat.items() if not jnp.issubdtype(v.dtype, jnp.floating))
    if not_float:
        more = f" (and {len(not_float) - 1} more tensors)" if len(not_float) > 1 else ""
        name = printable(not_float[0])
        raise ValueError(f"{path}: tensor {name} is {flat[not_float[0]].dtype}, params are floats{more}")
    try:
        check_depths(config, len(flat))
    except ValueError as e:
        raise ValueError(f"{path}: metadata 'config': {e}") from None
    model = build_sam(config)
    check_flat_params(flat, model, path)
    return model, jax.tree_util.tree_map(jnp.asarray, unflatten_params(flat))


def _config(path: str, meta: Mapping[str, str]) -> SamConfig:
    """The SamConfig recorded under the metadata key "config"; ValueError naming the file and key."""
    if "config" not in meta:
        raise ValueError(f"{path}: the metadata has no 'config' (the model's SamConfig as JSON)")
    try:
        d = json.loads(meta["config"])
    except ValueError as e:
        raise ValueError(f"{path}: metadata 'config' is not JSON ({e})") from None
    try:
        return SamConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{path}: metadata 'config': {e}") from None


def metadata(path: str) -> Dict[str, str]:
    """The header metadata of a safetensors file (read without loading its tensors)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether the file begins as every safetensors file does, whatever its name: an 8-byte
    little-endian header length that fits in the file, then the header's JSON object."""
    try:
        with open(path, "rb") as f:
            head, size = f.read(9), os.fstat(f.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8
