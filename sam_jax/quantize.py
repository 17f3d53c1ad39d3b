"""Post-training int8 quantization of a SAM model through qwix's interception.

`quantize(model, params, mode)` returns a model whose matmuls qwix intercepts and params whose
quantized kernels are stored int8 with float32 scales (qwix `WithAux` leaves holding a `QArray`);
the modeling code is unchanged. Modes:

  * "w8": int8 weights with one scale per 64 input channels of each output channel (`TILE_SIZE`),
    float compute (the kernel is rescaled in the graph), and the large float params that stay
    (`HALF_PARAMS`: position embedding, patch embedding and neck kernels, the mask decoder) stored
    float16: the memory mode, under 0.3x the float32 bytes;
  * "w8a8": int8 weights (one scale per output channel) and dynamic int8 activations (one scale
    per token, computed in the graph), int8 x int8 -> int32 dots: the speed mode. With
    `calibration` images, static activation scales instead (below).

The quantized model is called like a float one, through `apply(..., method="<name>")` or its bound
methods (`qmodel.encode_image`): qwix intercepts the methods in `METHODS` of the model's class, so
the UNBOUND functions of the float class (`Sam.encode_image`) run unintercepted and fail on the
quantized params. `SamPredictor`, `functional` and `backend` call the model by method name.

Which layers are quantized (`LAYERS`, `DEFAULT_LAYERS`). qwix intercepts `jax.lax.dot_general`
(what `nn.Dense` calls) and `jnp.einsum`, and stores a kernel int8 where it finds the
module's own parameter as an operand. Products written with `@` (`jnp.matmul`, a jitted function
whose inner trace qwix does not see) are not intercepted at all: the patch embedding and the neck
(SAM computes both convolutions as `@` matmuls) and the decoder's attention projections (`q @ wq`)
stay float in both modes; the decoder attention's fused einsums are quantized as activation
products in "w8a8" only. Convolutions (`lax.conv_general_dilated`) are left out: qwix's PTQ
quantizes a convolution's input whenever it quantizes its kernel. The decoder's layer-0
cross-attention projections must stay plain arrays anyway: `modeling.image_context` reads them.

The SAM family takes the same groups: SAM-HQ's ViT is SAM's (its decoder additions stay float,
float16 in "w8"); MobileSAM's TinyViT has its attention (qkv, proj) and MLP (fc1, fc2) matmuls in
its transformer stages quantized, and its convolution stages float. Their fidelity against their own
reference models is not measured: the figures below are vit_b's.

Per-layer measurement, int8 with one scale per output channel: vit_b with randomised official
weights (the test fixture's, seed 1), one photo (skimage.data.astronaut, 512 x 512 -> 1024), against
the same model in float32 (which equals the official fp32 model to ~1e-4 x std); one group of layers
quantized at a time. Encoder groups: embedding |error| mean / max over std(embedding), and the float
decoder's low-res logits from that embedding (one point + one negative point + box, 3 masks);
decoder groups: those logits from the float embedding. "-": nothing to quantize in that mode.
Measured 2026-12-05 (qwix 0.1.8, flax 0.12.8, jax 0.10, XLA:CPU).

| group (LAYERS)     | w8 embedding    | w8 logits       | w8a8 embedding  | w8a8 logits     |
| ------------------ | --------------- | --------------- | --------------- | --------------- |
| patch_embed        | - (`@`)         | -               | 0 (`@`)         | 0               |
| qkv                | 0.0183 / 0.172  | 0.0096 / 0.090  | 0.0261 / 0.262  | 0.0133 / 0.122  |
| attn_products      | -               | -               | 0.0253 / 0.257  | 0.0142 / 0.144  |
| proj               | 0.0107 / 0.110  | 0.0058 / 0.045  | 0.0153 / 0.154  | 0.0079 / 0.071  |
| mlp_lin1           | 0.0087 / 0.089  | 0.0048 / 0.040  | 0.0127 / 0.124  | 0.0065 / 0.055  |
| mlp_lin2           | 0.0099 / 0.103  | 0.0061 / 0.047  | 0.0164 / 0.148  | 0.0088 / 0.073  |
| neck               | - (`@`)         | -               | 0 (`@`)         | 0               |
| decoder_attention  |                 | - (`@`)         |                 | 0.0285 / 0.123  |
| decoder_mlp        |                 | 0.0099 / 0.046  |                 | 0.0119 / 0.058  |
| hypernetworks      |                 | 0.0092 / 0.056  |                 | 0.0135 / 0.081  |
| iou_head           |                 | 0 (IoU only)    |                 | 0 (IoU only)    |
| upscaling          |                 | 0.0077 / 0.046  |                 | 0.0131 / 0.092  |
| mask_product       |                 | -               |                 | 0.0080 / 0.062  |

What the masks see: mean / min mask IoU against the official fp32 predictor on the acceptance set
(tests/test_quantize.py: the same vit_b, 4 photos x 4 prompt kinds x 3 masks), the rest of the model
float32. Measured by rounding the official model's own weights (and, for int8 activations, each
Linear's input per token) and running it in float32: that reproduces ours to 1e-4 with per-channel
scales (encoder groups: 0.9946 there, 0.9947 here; all eight groups: 0.9917 / 0.9918) and to 6e-4
for the final modes ("w8" 0.9954 there, 0.9960 here; "w8a8" 0.9931 / 0.9932): differences of a few
1e-4 between rows are within what float rounding order alone moves on these masks. 2026-12-05.

| rounded                                                             | mean IoU | min IoU |
| ------------------------------------------------------------------- | -------- | ------- |
| encoder's four matmuls (qkv, proj, mlp_lin1/2), int8 per channel    | 0.9946   | 0.982   |
|   ... one scale per 128 input channels                              | 0.9954   | 0.989   |
|   ... one scale per 64 input channels                               | 0.9954   | 0.988   |
|   ... per output channel, asymmetric (min / max, zero point)        | 0.9949   | 0.989   |
|   ... per 64, with pos_embed, patch and neck kernels bfloat16       | 0.9953   | 0.989   |
|   ... per 64, with those float16                                    | 0.9954   | 0.988   |
|   ... and the whole decoder float16 ("w8")                          | 0.9954   | 0.988   |
|   ... int8 activations per token too, weights per channel ("w8a8")  | 0.9931   | 0.980   |
|   ... int8 activations and weights per 128 input channels           | 0.9942   | 0.986   |
|   ... torch.ao dynamic int8 (per-tensor weights and activations)    | 0.9858   | 0.964   |
| decoder_mlp, int8 per channel (encoder float)                       | 0.9971   | 0.991   |
| hypernetworks, int8 per channel                                     | 0.9970   | 0.993   |
| upscaling (74 K values), int8 per channel                           | 0.9970   | 0.990   |
| iou_head, int8 per channel                                          | 1        | 1       |
| those four, int8 per channel / per 64 input channels                | 0.9941 / 0.9955 | 0.981 / 0.988 |
| those four, bfloat16 / the whole decoder float16                    | 0.9988 / 0.9996 | 0.997 / 0.999 |

Why: the randomised weights are Gaussian, so int8 absmax rounding is a uniform error of ~0.7% of a
weight's spread per channel (the absmax of 768 Gaussian values is ~3.2 sigma), and on this model the
mask IoU lost grows with that error wherever it is added; torch.ao's default dynamic quantization
(per-tensor weights: absmax over the whole kernel) loses 2.6 times as much on the same set. Smaller
tiles bound the absmax (~2.4 sigma for 64 values): the only lever without calibration data. The
decoder's groups cost as much IoU as the encoder's rounding for 3 % of the values, so they stay
float in both modes; float16 (not bfloat16) storage of the decoder, position embedding and patch /
neck kernels buys back the bytes of the float decoder and of the subchannel scales.

Choice: the encoder's four matmuls, in both modes. "w8" with scales per 64 input channels: finer
tiles do not fit 0.3x (per 32: 10.6 MB of float32 scales on vit_b). "w8a8" with scales per output
channel: with int8 activations a tiled product is one int8 dot per tile, summed in float, for
+0.001 IoU. The activation x activation products stay float (`attn_products`: as costly in error
as qkv, for no memory; the decoder attention and mask product: no stored weights).

Fidelity against the official fp32 predictor (tests/test_quantize.py, full tier), 2026-12-05:
"w8" mean mask IoU 0.9960 (min 0.990), embedding mean error 0.026 x std, parameter bytes 0.2888 x
fp32 (int8 kernels, float32 scales, float16 and float32 rest); "w8a8" 0.9932 (min 0.979), embedding
0.050 x std, bytes 0.3213 x fp32 (the decoder float32). Both meet issue 27's acceptance (0.995 /
0.99 mean IoU, w8 <= 0.3x bytes). A 4-bit weight mode does not pay: int4 in the encoder's four
matmuls alone gives mean IoU 0.923 per output channel, 0.937 per 64 input channels (min 0.82).

Static activation scales ("w8a8" with `calibration` images, opt-in). The encoder runs on each
image and every layer of `STATIC_LAYERS` (the encoder's four matmuls) gets ONE scale per input
tensor, fixed: the mean over the images of the tensor's absmax / 127.5 (qwix's int8 bound; what
qwix's own statistics average), stored as a float32 (1,) `<op>_lhs_scale` beside the kernel.
Per tensor, not qwix's default: its static scale keeps the dynamic one's axes and averages over
the batch, one scale per token position, meaningless in windowed blocks (the windows share
them) and tied to the image size (`_PerTensorActivations`). Per channel is not an option: the
contracted axis can carry no scale of an int8 dot. Fidelity against the official fp32 predictor
(tests/test_quantize.py, full tier; calibrated on 4 skimage photos that are not the fidelity
photos: stereo_motorcycle, hubble_deep_field, retina, immunohistochemistry), 2026-12-05: mean
mask IoU 0.9917 (min 0.976), embedding mean error 0.065 x std, low-res logits 0.036 x std,
against dynamic scales' 0.9932 (min 0.979), 0.050 and 0.029: within the issue's 0.99, a little
below per-token scales (a fixed scale is coarser for quiet tokens, and clips tokens louder than
the calibration images' mean). Speed: vit_b `set_image` in the same process, 3 interleaved
rounds after a warm-up, on a 2-core AMD EPYC with AVX2 only and nothing else running: static
median 8.26 s against dynamic 7.87 s: no gain (the per-token absmax is a cheap reduction next to
the matmuls: `bench/profile_ops.py` puts all of w8a8's quantization and rescaling at ~0.5 s of
thunk time per encoder call). Calibrating vit_b takes ~1 minute (one compilation of the
encoder, then a pass per image). Decoder groups, when quantized, keep dynamic scales: their
inputs come from prompts, which calibration images do not have.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from . import inputs
from .build import Params, _dummy_inputs
from .checkpoints.params import SEP, check_params
from .functional import prepare_images
from .modeling import Sam
from .transforms import preprocess_padded

MODES = ("w8", "w8a8")

# Every entry point of `Sam` that runs a quantizable layer (init_all: `init`, to learn the shapes).
METHODS = (
    "__call__",
    "init_all",
    "encode_image",
    "encode_image_hq",
    "encode_image_interm",
    "encode_image_layers",
    "encode_prompts",
    "get_dense_pe",
    "decode",
    "decode_tokens",
    "decode_masks",
    "hq_features",
)

_BLOCK = r"image_encoder/(layers_\d+/)?blocks_\d+"
# Groups of layers: name -> (module path regex, ops). The matmuls of a module run as dot_general
# (`@`, nn.Dense) or einsum; convolutions are left alone (qwix's PTQ quantizes a convolution's
# input together with its kernel, and SAM computes its convolutions as matmuls anyway).
LAYERS: Dict[str, str] = {
    "patch_embed": r"image_encoder/patch_embed/.*",
    "qkv": _BLOCK + r"/attn/qkv",
    "attn_products": _BLOCK + r"/attn",  # q.k, attention @ v and the relative-position einsums
    "proj": _BLOCK + r"/attn/proj",
    "mlp_lin1": _BLOCK + r"/mlp/(lin1|fc1)",  # SAM's ViT: lin1; MobileSAM's TinyViT: fc1
    "mlp_lin2": _BLOCK + r"/mlp/(lin2|fc2)",
    "neck": r"image_encoder/neck_\d+",
    "decoder_attention": r"mask_decoder/transformer/(layers_\d+/)?\w*attn\w*",
    "decoder_mlp": r"mask_decoder/transformer/layers_\d+/mlp/lin\d",
    "hypernetworks": r"mask_decoder/output_hypernetworks_mlps_\d+/layers_\d+",
    "iou_head": r"mask_decoder/iou_prediction_head/layers_\d+",
    "upscaling": r"mask_decoder/output_upscaling_\d+",
    "mask_product": r"mask_decoder",  # hypernetwork vectors . upscaled image tokens
}
_OPS = ("dot_general", "einsum")

# The image encoder's four matmuls: 85 M of vit_b's 93.7 M values. The decoder stays float: each of
# its groups in int8 costs as much mask IoU as the whole encoder's rounding (see the table above).
DEFAULT_LAYERS: Dict[str, Tuple[str, ...]] = {
    "w8": ("qkv", "proj", "mlp_lin1", "mlp_lin2"),
    "w8a8": ("qkv", "proj", "mlp_lin1", "mlp_lin2"),
}

# Subchannel scales: one float32 scale per TILE_SIZE consecutive input channels of each output
# channel (None: one per output channel). A group whose contracted size TILE_SIZE does not divide
# gets the largest common divisor (`tile_sizes`). "w8a8" keeps one scale per output channel: with
# int8 activations qwix computes a tiled product as one int8 dot per tile, summed in float.
TILE_SIZE: Dict[str, Optional[int]] = {"w8": 64, "w8a8": None}

# The groups whose activations take static scales when "w8a8" is calibrated: the image encoder's
# weight matmuls, the layers that calibration images run through. Any other group keeps dynamic
# per-token scales.
STATIC_LAYERS = ("qkv", "proj", "mlp_lin1", "mlp_lin2")

# Float params "w8" stores as float16 (regexes on the param path): the absolute position embedding,
# the patch embedding and neck kernels and the whole mask decoder, 7.6 M values on vit_b, which
# buys back the subchannel scales and the float decoder. float16 rounding (2^-11 relative, 8x finer
# than bfloat16) of these costs no measurable mask IoU; bfloat16 cost 0.001 (table above).
# The model computes in float32 as before: each float16 param is promoted where it meets the float32
# activations, so the output is the float model's on float16-rounded params.
HALF = r"image_encoder/pos_embed|image_encoder/(patch_embed/proj|neck_\d+)/kernel|mask_decoder/.*"
HALF_PARAMS: Dict[str, Optional[str]] = {"w8": HALF, "w8a8": None}
HALF_DTYPE = jnp.float16


def _qwix():
    try:
        import qwix
    except ImportError:
        raise ImportError("quantization needs qwix: pip install 'sam-jax[quant]'") from None
    return qwix


def _is_aux(x: Any) -> bool:
    """A qwix `WithAux` leaf: a quantized kernel (holding a `QArray`) or a static activation scale."""
    return type(x).__name__ == "WithAux"


def is_quantized(model: Any = None, params: Optional[Params] = None) -> bool:
    """Whether `model` is a qwix-intercepted model or `params` hold quantized leaves."""
    if model is not None and hasattr(type(model), "_unquantized_type"):
        return True
    if params is not None:
        return any(_is_aux(x) for x in jax.tree_util.tree_leaves(params, is_leaf=_is_aux))
    return False


def _layer_names(mode: str, layers: Optional[Iterable[str]]) -> Tuple[str, ...]:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = DEFAULT_LAYERS[mode] if layers is None else tuple(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise ValueError(f"layers: unknown group(s) {unknown}; known: {sorted(LAYERS)}")
    return names


def rules(
    mode: str,
    layers: Optional[Iterable[str]] = None,
    tiles: Optional[Mapping[str, Optional[int]]] = None,
    static: bool = False,
) -> list:
    """The qwix rules of `mode` for the groups `layers` (names of `LAYERS`; default `DEFAULT_LAYERS`),
    with the subchannel tile size of each group in `tiles` (`tile_sizes`; absent: per channel).
    static ("w8a8" only): the groups of `STATIC_LAYERS` take static activation scales, one value
    per tensor (`_PerTensorActivations`)."""
    qwix = _qwix()
    names = _layer_names(mode, layers)
    act = jnp.int8 if mode == "w8a8" else None
    tiles = tiles or {}
    out = []
    for n in names:
        srq = {"act_static_scale": True} if static and act and n in STATIC_LAYERS else {}
        out.append(
            qwix.QuantizationRule(
                module_path=LAYERS[n],
                op_names=_OPS,
                weight_qtype=jnp.int8,
                act_qtype=act,
                tile_size=tiles.get(n),
                **srq,
            )
        )
    return out


class _PerTensorActivations:
    """qwix's `qarray` module with one static activation scale per tensor.

    qwix's PTQ calibrates a static scale like a dynamic one, over the contracted axis only, then
    averages it over `act_batch_axes`: one scale per token position, (1, 64, 64, 1) in a global
    block and (1, 14, 14, 1) in a windowed one (each position of the window shared by all windows),
    a shape that depends on the image size. Here `calibrate` reduces over every axis to one value,
    of shape (1,) (safetensors keeps no 0-d tensor), and `quantize_with_scale_zero_point` reshapes
    it to the operand's rank (qwix's `QArray` keeps
    one scale axis per operand axis): the same param serves operands of any rank (the windowed
    attention also projects a single zero token through its qkv layer, exactly 0 at any scale).
    PtqProvider calls these two functions of its `_qarray_module` for static scales only.
    """

    def __getattr__(self, name: str) -> Any:
        from qwix._src.core import qarray

        return getattr(qarray, name)

    def calibrate(self, array: jax.Array, how: Any) -> Dict[str, jax.Array]:
        from qwix._src.core import qarray

        stats = qarray.calibrate(array, dataclasses.replace(how, channelwise_axes=[]))
        return {k: v.reshape(1) for k, v in stats.items()}

    def quantize_with_scale_zero_point(self, array: jax.Array, qtype: Any, scale: jax.Array, zero_point, *a, **k):
        from qwix._src.core import qarray

        lift = (1,) * array.ndim
        zero_point = None if zero_point is None else zero_point.reshape(lift)
        return qarray.quantize_with_scale_zero_point(array, qtype, scale.reshape(lift), zero_point, *a, **k)


def tile_sizes(params: Params, layers: Iterable[str], tile_size: Optional[int]) -> Dict[str, Optional[int]]:
    """{group: tile size or None} for the float `params` (arrays or shapes): the largest divisor of
    `tile_size` that divides the contracted size (a kernel's input channels) of every kernel of the
    group; None where that is the whole axis, or for no `tile_size`."""
    kernels = {k[: -len("/kernel")]: v.shape for k, v in _flat(params).items() if k.endswith("/kernel")}
    out = {}
    for n in layers:
        sizes = [shape[-2] for path, shape in kernels.items() if re.fullmatch(LAYERS[n], path)]
        tile = math.gcd(tile_size, *sizes) if tile_size and sizes else None
        out[n] = None if tile is None or all(tile == s for s in sizes) else tile
    return out


def _flat(tree: Params) -> Dict[str, Any]:
    return traverse_util.flatten_dict(dict(tree), sep=SEP, is_leaf=lambda _, x: _is_aux(x))


def _to_half(params: Params, pattern: Optional[str]) -> Params:
    """`params` with the float leaves whose path matches `pattern` cast to `HALF_DTYPE`."""
    if pattern is None:
        return params
    flat = {
        k: v.astype(HALF_DTYPE) if not _is_aux(v) and re.fullmatch(pattern, k) else v for k, v in _flat(params).items()
    }
    return traverse_util.unflatten_dict(flat, sep=SEP)


def quantize(
    model: Sam,
    params: Params,
    mode: str,
    calibration: Optional[Sequence[Any]] = None,
    *,
    layers: Optional[Iterable[str]] = None,
) -> Tuple[Sam, Params]:
    """Post-training int8 quantization: (float model, float params) -> (qmodel, qparams).

    Args:
      model: a float `Sam` (from `build_sam` / `load`), not already quantized.
      params: its full parameter tree.
      mode: "w8" (int8 weights, one scale per 64 input channels, float compute, `HALF_PARAMS`
        stored float16) or "w8a8" (int8 weights per output channel and int8 activations,
        int8 x int8 -> int32 dots).
      calibration: "w8a8" only: a non-empty sequence of images (HWC uint8 RGB, grayscale HW, or
        any form `SamPredictor.set_image` takes) for static activation scales: the encoder runs
        on each, and each layer of `STATIC_LAYERS` gets one fixed scale per input tensor, the mean
        over the images of its absmax / 127.5 (qwix's int8 bound). None (default): dynamic
        scales, one per token, computed in the graph.
      layers: the groups of `LAYERS` to quantize (default `DEFAULT_LAYERS[mode]`).

    Returns:
      qmodel: `model` with qwix intercepting its entry points (`METHODS`): call it by method name
        (`method="encode_image"`) or bound method, like `SamPredictor` and `functional` do.
      qparams: `params` with each quantized kernel replaced by a qwix `WithAux` (int8 values, float32
        scales, both pytree leaves), with calibration a `WithAux` float32 (1,) per static
        activation scale (named `<op>_lhs_scale` beside the kernel) and, in "w8", `HALF_PARAMS`
        float16: jit, device_put and `SamPredictor` take it as they take params.
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
    if is_quantized(model=model):
        raise ValueError("model is already quantized: pass the float model and params")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if is_quantized(params=params):
        raise ValueError("params are already quantized: pass the float params")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a SAM parameter tree (a dict), got {type(params).__name__}")
    names = _layer_names(mode, layers)
    static = calibration is not None
    if static:
        if mode != "w8a8":
            raise ValueError(f'calibration sets static activation scales, a "w8a8" thing; mode {mode!r} has none')
        if not set(names) & set(STATIC_LAYERS):
            raise ValueError(f"calibration: none of layers {list(names)} takes static scales ({list(STATIC_LAYERS)})")
        images = calibration_inputs(calibration, model.config.image_size)
    check_params(params, model, "params")
    qmodel, abstract = _quantized_model(model, mode, names, tile_sizes(params, names, TILE_SIZE[mode]), static)
    float_params = jax.tree_util.tree_map(jnp.asarray, dict(params))
    if not static:
        qparams = _qwix().quantize_params(float_params, abstract)
        return qmodel, _to_half(qparams, HALF_PARAMS[mode])
    qparams = _qwix().quantize_params(float_params, _without(abstract, _static_scale_keys(abstract)))
    return qmodel, _with_static_scales(qmodel, qparams, abstract, images)


def calibration_inputs(calibration: Any, image_size: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Calibration images -> the inputs of `functional.encode_images` for each, one image at a
    time: (uint8 (1, S, S, 3) resized and zero-padded, int32 (1, 2) resized (h, w)). Every image
    is checked before any runs (ValueError / TypeError naming `calibration[i]`)."""
    if isinstance(calibration, np.ndarray) and calibration.ndim == 4:
        calibration = list(calibration)
    if not isinstance(calibration, (list, tuple)):
        raise TypeError(f"calibration must be a list of images (HWC arrays), got {type(calibration).__name__}")
    if not calibration:
        raise ValueError("calibration is empty: give at least one image")
    rgb = [inputs.as_rgb_uint8(image, name=f"calibration[{i}]") for i, image in enumerate(calibration)]
    out = []
    for image in rgb:
        padded, sizes, _ = prepare_images([image], image_size)
        out.append((padded, sizes))
    return out


def _is_static_scale(x: Any) -> bool:
    """A static activation scale: a WithAux holding a plain array (a kernel's holds a QArray)."""
    return _is_aux(x) and not hasattr(x.array, "qvalue")


def _static_scale_keys(abstract: Params) -> List[str]:
    return sorted(k for k, v in _flat(abstract).items() if _is_static_scale(v))


def _without(tree: Params, keys: Iterable[str]) -> Params:
    drop = set(keys)
    return traverse_util.unflatten_dict({k: v for k, v in _flat(tree).items() if k not in drop}, sep=SEP)


def _with_static_scales(
    qmodel: Sam, qparams: Params, abstract: Params, images: Sequence[Tuple[np.ndarray, np.ndarray]]
) -> Params:
    """qparams plus the static activation scales: the encoder runs on each calibration image with
    the scales missing, so that qwix computes each from the tensor it meets (absmax / 127.5, with
    the earlier layers already quantized by that image's scales); each scale is the mean over the
    images, what qwix's own statistics (`SimpleMovingAverage`) give."""
    keys = _static_scale_keys(abstract)

    @jax.jit
    def scales(qparams, padded, sizes):
        _, made = qmodel.apply(
            {"params": qparams},
            preprocess_padded(padded, sizes),
            method="encode_image",
            mutable=["params"],
            rngs={"params": jax.random.PRNGKey(0)},  # asked for by Flax when a param is created; unused
        )
        flat = _flat(made["params"])
        return {k: flat[k].array for k in keys if k in flat}

    total: Dict[str, jax.Array] = {}
    for padded, sizes in images:
        for k, v in scales(qparams, padded, sizes).items():
            total[k] = total.get(k, 0.0) + v
    missing = sorted(set(keys) - set(total))
    if missing:  # every static layer sits in the encoder: a layer it does not run is a bug here
        raise RuntimeError(f"calibration did not reach {missing[:3]} ({len(missing)} scales)")
    abs_flat = _flat(abstract)
    flat = dict(_flat(qparams))
    for k in keys:
        flat[k] = abs_flat[k].replace(array=(total[k] / len(images)).astype(abs_flat[k].array.dtype))
    return traverse_util.unflatten_dict(flat, sep=SEP)


def _quantized_model(
    model: Sam, mode: str, names: Tuple[str, ...], tiles: Mapping[str, Optional[int]], static: bool = False
) -> Tuple[Sam, Params]:
    """(qmodel, its abstract param tree: ShapeDtypeStructs, WithAux where a kernel is quantized or,
    static, a static activation scale is)."""
    qwix = _qwix()
    extra = {"_qarray_module": _PerTensorActivations()} if static else {}
    provider = qwix.PtqProvider(rules(mode, names, tiles, static), **extra)
    qmodel = qwix.quantize_model(model, provider, methods=METHODS)
    # What `save` records: the same model is rebuilt from it on `load`.
    type(qmodel).sam_jax_quantization = {"mode": mode, "layers": list(names), "tiles": dict(tiles), "static": static}
    abstract = jax.eval_shape(
        lambda rng: qmodel.init(rng, *_dummy_inputs(model.config), method="init_all"), jax.random.PRNGKey(0)
    )["params"]
    return qmodel, abstract


def quantization_of(model: Any) -> Optional[Dict[str, Any]]:
    """{"mode", "layers", "tiles", "static"} of a model `quantize` returned; None for a float model.
    "static": whether its "w8a8" activation scales are static (calibrated)."""
    return getattr(type(model), "sam_jax_quantization", None)


# Tensor names of a quantized kernel in a file: its int8 values and its float32 scales.
QVALUE, SCALE = ":qvalue", ":scale"


def to_tensors(qparams: Params) -> Dict[str, np.ndarray]:
    """Quantized params -> flat {name: numpy array} for a file: float leaves and static activation
    scales (float32, shape (1,)) under their path, each quantized kernel as path + QVALUE (int8) and
    path + SCALE (float32)."""
    flat = _flat(qparams)
    out = {}
    for k, v in flat.items():
        if _is_static_scale(v):
            out[k] = np.asarray(v.array)
        elif _is_aux(v):
            out[k + QVALUE] = np.asarray(v.array.qvalue)
            out[k + SCALE] = np.asarray(v.array.scale)
        else:
            out[k] = np.asarray(v)
    return out


def from_tensors(model: Sam, tensors: Mapping[str, Any], quantization: Mapping[str, Any]) -> Tuple[Sam, Params]:
    """`to_tensors`' output, with the `quantization_of` the quantized model -> (qmodel, qparams).
    ValueError naming every tensor missing, unexpected or of another shape or dtype."""
    qwix = _qwix()
    mode, layers, tiles, static = (
        (
            quantization.get("mode"),
            quantization.get("layers"),
            quantization.get("tiles", {}),
            quantization.get("static", False),  # files written before static scales existed
        )
        if isinstance(quantization, Mapping)
        else (0, 0, 0, 0)
    )
    if (
        mode not in MODES
        or not isinstance(layers, (list, tuple))
        or not isinstance(tiles, Mapping)
        or not all(t is None or (isinstance(t, int) and t > 0) for t in tiles.values())
        or not isinstance(static, bool)
        or (static and mode != "w8a8")
    ):
        raise ValueError(
            f"quantization must be {{'mode': one of {MODES}, 'layers': [...], 'tiles': {{layer: size or None}}, "
            f"'static': true (w8a8 only) or false}}, got {quantization!r}"
        )
    names = _layer_names(mode, layers)
    qmodel, abstract = _quantized_model(model, mode, names, {n: tiles.get(n) for n in names}, static)
    want = _flat(abstract)
    expected = {}
    for k, v in want.items():
        if _is_static_scale(v):
            expected[k] = (tuple(v.array.shape), np.dtype(v.array.dtype))
        elif _is_aux(v):
            expected[k + QVALUE] = (tuple(v.array.qvalue.shape), np.dtype(v.array.qvalue.dtype))
            expected[k + SCALE] = (tuple(v.array.scale.shape), np.dtype(v.array.scale.dtype))
        else:
            expected[k] = (tuple(v.shape), None)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(tensors))]
    problems += [f"unexpected {k}" for k in sorted(set(tensors) - set(expected))]
    for k in sorted(set(expected) & set(tensors)):
        shape, dtype = expected[k]
        t = tensors[k]
        if tuple(t.shape) != shape or (dtype is not None and np.dtype(t.dtype) != dtype):
            problems.append(f"{k}: {np.dtype(t.dtype)} {tuple(t.shape)}, expected {dtype or 'float'} {shape}")
        elif dtype is None and not jnp.issubdtype(t.dtype, jnp.floating):
            problems.append(f"{k}: {np.dtype(t.dtype)}, params are floats")
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise ValueError(f"quantized params do not fit the model: {'; '.join(problems[:6])}{more}")
    out = {}
    for k, v in want.items():
        if _is_static_scale(v):
            out[k] = v.replace(array=jnp.asarray(tensors[k]))
        elif _is_aux(v):
            q = qwix.QArray(
                qvalue=jnp.asarray(tensors[k + QVALUE]), scale=jnp.asarray(tensors[k + SCALE]), qtype=jnp.int8
            )
            out[k] = v.replace(array=q)
        else:
            out[k] = jnp.asarray(tensors[k])
    return qmodel, traverse_util.unflatten_dict(out, sep=SEP)


def param_bytes(params: Params) -> int:
    """Bytes the arrays of a (quantized or float) parameter tree hold."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(params))
