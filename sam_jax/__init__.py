"""sam_jax: Segment Anything in JAX/Flax, numerically faithful to the official PyTorch model."""

from .build import build_sam, count_params, init_params, param_shapes
from .checkpoints import load, save
from .config import PIXEL_MEAN, PIXEL_STD, PRESETS, SamConfig, get_config
from .modeling import PAD_LABEL, Sam

__version__ = "0.1.0"

__all__ = [
    "PAD_LABEL",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "PRESETS",
    "Sam",
    "SamConfig",
    "build_sam",
    "count_params",
    "get_config",
    "init_params",
    "load",
    "param_shapes",
    "save",
]

# Prediction (issue 3): the official SamPredictor API, and its jittable building blocks.
from .functional import decode_prompts, encode_images, prepare_images  # noqa: E402
from .predictor import SamPredictor  # noqa: E402

__all__ += ["SamPredictor", "decode_prompts", "encode_images", "prepare_images"]

# Automatic mask generation (issue 4): the official SamAutomaticMaskGenerator on the device.
from .amg import SamAutomaticMaskGenerator  # noqa: E402

__all__ += ["SamAutomaticMaskGenerator"]

# Post-training int8 quantization (issue 27) through qwix, imported when called.
from .quantize import quantize  # noqa: E402

__all__ += ["quantize"]
