"""Post-training int8 quantization of a SAM model through qwix's interception.

`quantize(model, params, mode)` returns a model whose matmuls qwix intercepts and params whose
quantized kernels are stored int8 with float32 scales (qwix `WithAux` leaves holding a `QArray`);
the modeling code is unchanged. Modes:

  * "w8": int8 weights with one scale per 64 input channels of each output channel (`TILE_SIZE`),
    float compute (the kernel is rescaled in the graph), and the large float params that stay
    (`HALF_PARAMS`: position embedding, patch embedding and neck kernels, the mask decoder) stored
    float16: the memory mode, under 0.3x the float32 bytes;
  * "w8a8": int8 weights (one scale per output channel) and dynamic int8 activations (one scale
    per token, computed in the graph), int8 x int8 -> int32 dots: the speed mode.

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
Calibration (static activation scales from a few images) is not implemented: per-token dynamic
scales already meet the "w8a8" target, and static scales, fixed before the image is seen, are
coarser than per-token ones (not measured); their gain would be speed, not fidelity.
"""

from __future__ import annotations

import math
import re
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


def is_quantized(model: Any = None, params: Optional[Params] = None) -> bool:
    """Whether `model` is a qwix-intercepted model or `params` hold quantized leaves."""
    if model is not None and hasattr(type(model), "_unquantized_type"):
        return True
    if params is not None:
        leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: type(x).__name__ == "WithAux")
        return any(type(x).__name__ == "WithAux" for x in leaves)
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
    mode: str, layers: Optional[Iterable[str]] = None, tiles: Optional[Mapping[str, Optional[int]]] = None
) -> list:
    """The qwix rules of `mode` for the groups `layers` (names of `LAYERS`; default `DEFAULT_LAYERS`),
    with the subchannel tile size of each group in `tiles` (`tile_sizes`; absent: per channel)."""
    qwix = _qwix()
    names = _layer_names(mode, layers)
    act = jnp.int8 if mode == "w8a8" else None
    tiles = tiles or {}
    return [
        qwix.QuantizationRule(
            module_path=LAYERS[n], op_names=_OPS, weight_qtype=jnp.int8, act_qtype=act, tile_size=tiles.get(n)
        )
        for n in names
    ]


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
    is_aux = lambda x: type(x).__name__ == "WithAux"  # noqa: E731
    return traverse_util.flatten_dict(dict(tree), sep=SEP, is_leaf=lambda _, x: is_aux(x))


def _to_half(params: Params, pattern: Optional[str]) -> Params:
    """`params` with the float leaves whose path matches `pattern` cast to `HALF_DTYPE`."""
    if pattern is None:
        return params
    flat = {
        k: v.astype(HALF_DTYPE) if type(v).__name__ != "WithAux" and re.fullmatch(pattern, k) else v
        for k, v in _flat(params).items()
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
        stored float16) or "w8a8" (int8 weights per output channel and dynamic per-token int8
        activations, int8 x int8 -> int32 dots).
      calibration: reserved for static activation scales; must be None for now.
      layers: the groups of `LAYERS` to quantize (default `DEFAULT_LAYERS[mode]`).

    Returns:
      qmodel: `model` with qwix intercepting its entry points (`METHODS`): call it by method name
        (`method="encode_image"`) or bound method, like `SamPredictor` and `functional` do.
      qparams: `params` with each quantized kernel replaced by a qwix `WithAux` (int8 values, float32
        scales, both pytree leaves) and, in "w8", `HALF_PARAMS` float16: jit, device_put and
        `SamPredictor` take it as they take params.
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
    names = _layer_names(mode, layers)
    qmodel, abstract = _quantized_model(model, mode, names, tile_sizes(params, names, TILE_SIZE[mode]))
    qparams = _qwix().quantize_params(jax.tree_util.tree_map(jnp.asarray, dict(params)), abstract)
    return qmodel, _to_half(qparams, HALF_PARAMS[mode])


def _quantized_model(
    model: Sam, mode: str, names: Tuple[str, ...], tiles: Mapping[str, Optional[int]]
) -> Tuple[Sam, Params]:
    """(qmodel, its abstract param tree: ShapeDtypeStructs, WithAux where a kernel is quantized)."""
    qwix = _qwix()
    qmodel = qwix.quantize_model(model, qwix.PtqProvider(rules(mode, names, tiles)), methods=METHODS)
    # What `save` records: the same model is rebuilt from it on `load`.
    type(qmodel).sam_jax_quantization = {"mode": mode, "layers": list(names), "tiles": dict(tiles)}
    abstract = jax.eval_shape(
        lambda rng: qmodel.init(rng, *_dummy_inputs(model.config), method="init_all"), jax.random.PRNGKey(0)
    )["params"]
    return qmodel, abstract


def quantization_of(model: Any) -> Optional[Dict[str, Any]]:
    """{"mode", "layers", "tiles"} of a model `quantize` returned; None for a float model."""
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
    mode, layers, tiles = (
        (quantization.get("mode"), quantization.get("layers"), quantization.get("tiles", {}))
        if isinstance(quantization, Mapping)
        else (0, 0, 0)
    )
    if (
        mode not in MODES
        or not isinstance(layers, (list, tuple))
        or not isinstance(tiles, Mapping)
        or not all(t is None or (isinstance(t, int) and t > 0) for t in tiles.values())
    ):
        raise ValueError(
            f"quantization must be {{'mode': one of {MODES}, 'layers': [...], 'tiles': {{layer: size or None}}}}, "
            f"got {quantization!r}"
        )
    names = _layer_names(mode, layers)
    qmodel, abstract = _quantized_model(model, mode, names, {n: tiles.get(n) for n in names})
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
