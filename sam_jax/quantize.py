"""Post-training int8 quantization of a SAM model through qwix's interception.

`quantize(model, params, mode)` returns a model whose matmuls qwix intercepts and params whose
quantized kernels are stored int8 with one float32 scale per output channel (qwix `WithAux`
leaves holding a `QArray`); the modeling code is unchanged. Modes:

  * "w8": int8 weights, float compute (the kernel is rescaled in the graph): the memory mode;
  * "w8a8": int8 weights and dynamic int8 activations (one scale per token, computed in the
    graph), int8 x int8 -> int32 dots: the speed mode.

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

Per-layer measurement: vit_b with randomised official weights (the test fixture's, seed 1), one
photo (skimage.data.astronaut, 512 x 512 -> 1024), against the same model in float32 (which equals
the official fp32 model to ~1e-4 x std); one group of layers quantized at a time. Encoder groups:
embedding |error| mean / max over std(embedding), and the float decoder's low-res logits from that
embedding (one point + one negative point + box, 3 masks); decoder groups: those logits from the
float embedding. "-": nothing to quantize in that mode. Measured 2026-12-05 (qwix 0.1.8, flax
0.12.8, jax 0.10, XLA:CPU).

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
| DEFAULT_LAYERS     | 0.0251 / 0.235  | 0.0195 / 0.135  | 0.0368 / 0.391  | 0.0302 / 0.215  |

Choice: every group with stored weights is quantized (their errors are alike, and together they are
what brings w8 to 0.2985x the fp32 bytes: the four encoder matmuls alone hold 85 M of vit_b's
93.7 M values). The activation x activation products stay float: the attention scores / values
(`attn_products`: as costly in error as qkv, for no memory), the decoder attention (the largest
decoder error, 0.029, and its weights cannot be stored int8) and the mask product (no weights; one
small product per mask). The IoU head is quantized: it moves the IoU predictions only.

Fidelity against the official fp32 predictor (tests/test_quantize.py, full tier; randomised vit_b,
4 photos x 4 prompt kinds x 3 masks), 2026-12-05: w8 mean mask IoU 0.9918 (min 0.973), embedding
mean error 0.034 x std, parameter bytes 0.2985 x fp32; w8a8 mean IoU 0.9888 (min 0.965), embedding
0.050 x std. Both are short of issue 27's acceptance (0.995 / 0.99). w8 equals the float model run
on the dequantized kernels exactly, so the gap is int8 per-channel rounding itself: quantizing
only the encoder's four matmuls gives 0.9947, the decoder groups alone 0.9942 (JAX fp32 reference),
and the byte bound leaves no room to keep more layers float (decoder hypernetworks and upscaling
float: 0.3035 x). What could close it: subchannel scales (qwix `tile_size`: +3% bytes at 128),
GPTQ-style rounding from calibration images (qwix.contrib), or `@` products rewritten as einsums
in modeling so the patch embedding, neck and decoder attention can be stored int8 too (~4 MB).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from .build import Params, _dummy_inputs
from .checkpoints.params import SEP, check_params
from .modeling import Sam

MODES = ("w8", "w8a8")

# Every entry point of `Sam` that runs a quantizable layer (init_all: `init`, to learn the shapes).
METHODS = (
    "__call__",
    "init_all",
    "encode_image",
    "encode_image_hq",
    "encode_image_layers",
    "encode_prompts",
    "get_dense_pe",
    "decode",
    "decode_tokens",
    "decode_masks",
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
    "mlp_lin1": _BLOCK + r"/mlp/lin1",
    "mlp_lin2": _BLOCK + r"/mlp/lin2",
    "neck": r"image_encoder/neck_\d+",
    "decoder_attention": r"mask_decoder/transformer/(layers_\d+/)?\w*attn\w*",
    "decoder_mlp": r"mask_decoder/transformer/layers_\d+/mlp/lin\d",
    "hypernetworks": r"mask_decoder/output_hypernetworks_mlps_\d+/layers_\d+",
    "iou_head": r"mask_decoder/iou_prediction_head/layers_\d+",
    "upscaling": r"mask_decoder/output_upscaling_\d+",
    "mask_product": r"mask_decoder",  # hypernetwork vectors . upscaled image tokens
}
_OPS = ("dot_general", "einsum")

DEFAULT_LAYERS: Dict[str, Tuple[str, ...]] = {
    "w8": ("qkv", "proj", "mlp_lin1", "mlp_lin2", "decoder_mlp", "hypernetworks", "iou_head", "upscaling"),
    "w8a8": ("qkv", "proj", "mlp_lin1", "mlp_lin2", "decoder_mlp", "hypernetworks", "iou_head", "upscaling"),
}


def _qwix():
    try:
        import qwix
    except ImportError:
        raise ImportError("quantization needs qwix: pip install 'sam-jax[quant]'") from None
    return qwix


def is_quantized(model: Any = None, params: Optional[Params] = None) -> bool:
    """Whether `model` is a qwix-intercepted model or `params` hold quantized leaves."""
    if model is not None and hasattr(type(model), "_unquantized_type"):
        return True
    if params is not None:
        leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: type(x).__name__ == "WithAux")
        return any(type(x).__name__ == "WithAux" for x in leaves)
    return False


def rules(mode: str, layers: Optional[Iterable[str]] = None) -> list:
    """The qwix rules of `mode` for the groups `layers` (names of `LAYERS`; default `DEFAULT_LAYERS`)."""
    qwix = _qwix()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    names = DEFAULT_LAYERS[mode] if layers is None else tuple(layers)
    unknown = [n for n in names if n not in LAYERS]
    if unknown:
        raise ValueError(f"layers: unknown group(s) {unknown}; known: {sorted(LAYERS)}")
    act = jnp.int8 if mode == "w8a8" else None
    return [
        qwix.QuantizationRule(module_path=LAYERS[n], op_names=_OPS, weight_qtype=jnp.int8, act_qtype=act) for n in names
    ]


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
      mode: "w8" (int8 weights per output channel, float compute) or "w8a8" (int8 weights and
        dynamic per-token int8 activations, int8 x int8 -> int32 dots).
      calibration: reserved for static activation scales; must be None for now.
      layers: the groups of `LAYERS` to quantize (default `DEFAULT_LAYERS[mode]`).

    Returns:
      qmodel: `model` with qwix intercepting its entry points (`METHODS`): call it by method name
        (`method="encode_image"`) or bound method, like `SamPredictor` and `functional` do.
      qparams: `params` with each quantized kernel replaced by a qwix `WithAux` (int8 values, float32
        scales, both pytree leaves): jit, device_put and `SamPredictor` take it as they take params.
    """
    if not isinstance(model, Sam):
        raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
    if is_quantized(model=model):
        raise ValueError("model is already quantized: pass the float model and params")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if calibration is not None:
        raise NotImplementedError("calibration: static activation scales are not implemented yet; pass None")
    if is_quantized(params=params):
        raise ValueError("params are already quantized: pass the float params")
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a SAM parameter tree (a dict), got {type(params).__name__}")
    check_params(params, model, "params")
    qmodel, abstract = _quantized_model(model, mode, layers)
    qparams = _qwix().quantize_params(jax.tree_util.tree_map(jnp.asarray, dict(params)), abstract)
    return qmodel, qparams


def _quantized_model(model: Sam, mode: str, layers: Optional[Iterable[str]]) -> Tuple[Sam, Params]:
    """(qmodel, its abstract param tree: ShapeDtypeStructs, WithAux where a kernel is quantized)."""
    qwix = _qwix()
    names = DEFAULT_LAYERS[mode] if layers is None else tuple(layers)
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules(mode, names)), methods=METHODS)
    # What `save` records: the same model is rebuilt from it on `load`.
    type(qmodel).sam_jax_quantization = {"mode": mode, "layers": list(names)}
    abstract = jax.eval_shape(
        lambda rng: qmodel.init(rng, *_dummy_inputs(model.config), method="init_all"), jax.random.PRNGKey(0)
    )["params"]
    return qmodel, abstract


def quantization_of(model: Any) -> Optional[Dict[str, Any]]:
    """{"mode", "layers"} of a model `quantize` returned; None for a float model."""
    return getattr(type(model), "sam_jax_quantization", None)


# Tensor names of a quantized kernel in a file: its int8 values and its float32 scales.
QVALUE, SCALE = ":qvalue", ":scale"


def to_tensors(qparams: Params) -> Dict[str, np.ndarray]:
    """Quantized params -> flat {name: numpy array} for a file: float leaves under their path,
    each quantized kernel as path + QVALUE (int8) and path + SCALE (float32)."""
    is_aux = lambda x: type(x).__name__ == "WithAux"  # noqa: E731
    flat = traverse_util.flatten_dict(dict(qparams), sep=SEP, is_leaf=lambda _, x: is_aux(x))
    out = {}
    for k, v in flat.items():
        if is_aux(v):
            out[k + QVALUE] = np.asarray(v.array.qvalue)
            out[k + SCALE] = np.asarray(v.array.scale)
        else:
            out[k] = np.asarray(v)
    return out


def from_tensors(model: Sam, tensors: Mapping[str, Any], quantization: Mapping[str, Any]) -> Tuple[Sam, Params]:
    """`to_tensors`' output, with the `quantization_of` the quantized model -> (qmodel, qparams).
    ValueError naming every tensor missing, unexpected or of another shape or dtype."""
    qwix = _qwix()
    mode, layers = (
        (quantization.get("mode"), quantization.get("layers")) if isinstance(quantization, Mapping) else (0, 0)
    )
    if mode not in MODES or not isinstance(layers, (list, tuple)):
        raise ValueError(f"quantization must be {{'mode': one of {MODES}, 'layers': [...]}}, got {quantization!r}")
    qmodel, abstract = _quantized_model(model, mode, layers)
    is_aux = lambda x: type(x).__name__ == "WithAux"  # noqa: E731
    want = traverse_util.flatten_dict(abstract, sep=SEP, is_leaf=lambda _, x: is_aux(x))
    expected = {}
    for k, v in want.items():
        if is_aux(v):
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
        if is_aux(v):
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
