"""Checkpoint conversion: official SAM `.pth` -> sam_jax `.safetensors` (`python -m convert`)."""

from .errors import ConversionError
from .official import (convert_state_dict, detect_config, export_state_dict, load_official,
                       plan_conversion, read_pth)

__all__ = ["ConversionError", "convert_state_dict", "detect_config", "export_state_dict",
           "load_official", "plan_conversion", "read_pth"]
