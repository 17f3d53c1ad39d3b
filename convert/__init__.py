"""The checkpoint conversion tool: `python -m convert SRC DST` (official `.pth` or Hugging Face ->
sam_jax `.safetensors`; `--to hf` / `--to pytorch` back). The rules live in `sam_jax.checkpoints`;
the names below are kept here for code that imports them from the tool."""

from sam_jax.checkpoints import (
    ConversionError,
    convert_state_dict,
    detect_config,
    export_state_dict,
    load_official,
    plan_conversion,
    read_pth,
)

__all__ = [
    "ConversionError",
    "convert_state_dict",
    "detect_config",
    "export_state_dict",
    "load_official",
    "plan_conversion",
    "read_pth",
]
