"""sam_jax params -> an official-format PyTorch checkpoint (.pth) that
`segment_anything.sam_model_registry[model_type](checkpoint=path)` loads strictly.

The inverse of the converter: `official.export_state_dict` maps names and layouts; this
module checks the tree against the model, adds nothing and drops nothing, and writes the tensors
with `torch.save` (a plain {name: tensor} dict, loadable with `weights_only=True`).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Union

import numpy as np

from .._atomic import atomic_file
from ..build import build_sam
from .errors import ConversionError
from .official import detect_config, export_state_dict, resolve_config
from .params import check_params, flatten_params
from .sources import load

ParamsLike = Union[str, os.PathLike, Mapping[str, Any]]


def _load_params(src: ParamsLike):
    """A sam_jax .safetensors path or a params tree -> (SamConfig or None, params)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not path.endswith(".safetensors"):
            raise ConversionError(f"{path}: expected a sam_jax .safetensors file")
        try:
            model, params = load(path)
        except (ValueError, FileNotFoundError) as e:
            raise ConversionError(str(e)) from None
        return model.config, params
    if isinstance(src, Mapping):
        return None, src
    raise TypeError(f"params_path_or_params must be a path or a params tree, got {type(src).__name__}")


def export_pth(
    params_path_or_params: ParamsLike, out_path: Union[str, os.PathLike], config: Any = None
) -> Dict[str, Any]:
    """Writes an official SAM state_dict to `out_path` and returns it ({key: torch.Tensor}).

    Args:
      params_path_or_params: a sam_jax `.safetensors` file, or a params tree (LoRA adapters must be
        merged first: `sam_jax.train.merge_lora`).
      out_path: the `.pth` to write (atomically: `atomic_file`).
      config: preset name or SamConfig the tree must fit; by default it is read from the file, or
        detected from the tensor shapes of a params tree.
    Raises ConversionError listing every missing, unexpected or mis-shaped tensor.
    """
    try:
        import torch
    except ImportError:
        raise ConversionError("writing .pth checkpoints needs PyTorch: pip install 'sam-jax[torch]'") from None
    file_config, params = _load_params(params_path_or_params)
    leaves = flatten_params(dict(params))
    adapters = sorted(k for k in leaves if "lora" in k.rsplit("/", 1)[-1])
    if adapters:
        raise ConversionError("params hold LoRA adapters: merge them first (sam_jax.train.merge_lora)", adapters)
    state = export_state_dict(params)
    shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
    cfg = file_config if config is None else config
    cfg = detect_config(shapes) if cfg is None else resolve_config(shapes, cfg)
    try:
        check_params(params, build_sam(cfg), "params")
    except ValueError as e:
        raise ConversionError(str(e)) from None
    # Parameters as float32 whatever their dtype here; BatchNorm's counters stay int64.
    tensors = {
        k: torch.from_numpy(np.array(v, dtype=np.float32 if np.issubdtype(np.asarray(v).dtype, np.floating) else None))
        for k, v in state.items()
    }
    # atomic_file checks the folder first: torch.save would raise a RuntimeError for a missing one.
    with atomic_file(out_path) as tmp:
        torch.save(tensors, tmp)
    return tensors
