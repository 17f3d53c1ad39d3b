"""Checkpoints: reading, writing and converting weights (the `convert` tool and `sam_jax.load` use it).

    params.py          params tree <-> flat {path: array}; the strict check against a model
    native.py          the sam_jax `.safetensors` file (`sam_jax.save`)
    official.py        Meta's official state_dict <-> params (the layout rules), reading `.pth`
    hf.py              Hugging Face `SamModel` / `SamHQModel` names and config.json <-> the official state_dict
    pytorch_export.py  params -> an official `.pth`
    sources.py         any of these -> params (`sam_jax.load`, `load_source`)

Only torch-free code runs at import; reading or writing `.pth` imports torch when called.
"""

from .errors import ConversionError
from .hf import convert_hf_state_dict, export_hf, load_hf
from .native import save
from .official import convert_state_dict, detect_config, export_state_dict, load_official, plan_conversion, read_pth
from .params import check_params, flatten_params, unflatten_params
from .pytorch_export import export_pth
from .sources import load, load_source

__all__ = [
    "ConversionError",
    "check_params",
    "convert_hf_state_dict",
    "convert_state_dict",
    "detect_config",
    "export_hf",
    "export_pth",
    "export_state_dict",
    "flatten_params",
    "load",
    "load_hf",
    "load_official",
    "load_source",
    "plan_conversion",
    "read_pth",
    "save",
    "unflatten_params",
]
