"""The jit-compiled building blocks of `SamPredictor`, and its bucket sizes.

`encode_images` and `decode_prompts` are pure functions for use inside your own `jax.jit`; they
work in the MODEL-INPUT frame (the S x S square the image is resized into, S = 1024 officially),
with NHWC embeddings. `SamPredictor` wraps them with original-image coordinates and numpy outputs.

Compilation discipline (what compiles when):
  * encoder: once per number of images in a call (`set_image` is one image). Images are resized on
    the host with Pillow, zero-padded to S x S uint8, and their (h, w) travels as data, so image
    size never recompiles;
  * decoder: once per (prompt kinds present, multimask_output, point bucket, prompt bucket). Point
    sets are padded to `point_bucket` slots with `PAD_LABEL`, which the model masks out of
    attention: the result equals the unpadded computation. Batches of prompts are padded to a
    power of two up to MAX_PROMPTS_PER_CALL and longer batches run in chunks of that size;
  * mask upscaling: once per (padded output size, prompt bucket, masks per prompt, return_logits).
    Output sides are padded to `size_bucket` sides and sliced on the host; the crop + two bilinear
    resizes travel as interpolation tables (arrays), so images whose sides fall in the same
    buckets share one compilation.
"""

from __future__ import annotations

import functools
import math
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from . import inputs
from .build import Params
from .modeling import Sam
from .modeling import image_context as modeling_image_context
from .transforms import pad_to_square, preprocess_padded, resize_longest_side, upscale_masks

MASK_THRESHOLD = 0.0
# Point slots per prompt: 1, 4, 16, 64, 256, ... (x4). The decoder's attention work grows with the
# number of prompt tokens (see modeling.transformer.Attention), so the most common call, one
# click, gets its own bucket: 4 slots cost ~14% more decoder work than 1 for vit_b on CPU.
MIN_POINT_SLOTS = 1
MAX_PROMPTS_PER_CALL = 64
# Output sides of the mask upscaling: 256 * sqrt(2)^k rounded up to a multiple of 16 (256, 368,
# 512, 736, 1024, 1456, 2048, 2912, 4096, 5808, 8192, ...): at most ~2x the pixels of the image.
SIZE_BUCKET_BASE = 256

Tables = Tuple[Tuple[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]


def point_bucket(n: int) -> int:
    """Number of point slots a prompt with n points is padded to."""
    b = MIN_POINT_SLOTS
    while n > b:
        b *= 4
    return b


def prompt_bucket(b: int) -> int:
    """Number of prompts a chunk of b <= MAX_PROMPTS_PER_CALL prompts is padded to (power of 2)."""
    return min(1 << max(b - 1, 0).bit_length(), MAX_PROMPTS_PER_CALL)


def size_bucket(n: int) -> int:
    """Padded output side for an image side of n pixels (see SIZE_BUCKET_BASE)."""
    k = 0
    while True:
        b = -(-math.ceil(SIZE_BUCKET_BASE * 2 ** (k / 2)) // 16) * 16
        if n <= b:
            return b
        k += 1


# --- Pure functions: usable inside your own jax.jit. ---


def prepare_images(images: Sequence[Any], image_size: int, image_format: str = "RGB"
                   ) -> Tuple[np.ndarray, np.ndarray, List[Tuple[int, int]]]:
    """Host side: images (any accepted form, see `inputs.as_rgb_uint8`) -> the inputs of
    `encode_images`: uint8 (B, S, S, 3) resized and zero-padded, resized sizes int32 (B, 2) as
    (h, w), and the original (H, W) of each."""
    padded, sizes, originals = [], [], []
    for i, image in enumerate(images):
        rgb = inputs.as_rgb_uint8(image, image_format, name="image" if len(images) == 1 else f"images[{i}]")
        resized = resize_longest_side(rgb, image_size)
        padded.append(pad_to_square(resized, image_size))
        sizes.append(resized.shape[:2])
        originals.append(rgb.shape[:2])
    return np.stack(padded), np.asarray(sizes, np.int32), originals


def encode_images(model: Sam, params: Params, images: jax.Array, sizes: jax.Array) -> jax.Array:
    """uint8 (B, S, S, 3) RGB images resized into the top-left of the S x S frame, with their
    resized (h, w) as int (B, 2) -> image embeddings (B, S/16, S/16, C) NHWC float32.

    Normalises and zeroes the padding on the device, so the shape (and the compilation) does not
    depend on the image size. `prepare_images` makes the inputs on the host.
    """
    return model.apply({"params": params}, preprocess_padded(images, sizes), method=Sam.encode_image)


def dense_pe(model: Sam, params: Params) -> jax.Array:
    """The positional encoding of the embedding grid, (h, w, C): the same for every image and
    prompt, so `decode_prompts` can take it precomputed (its sin/cos are ~10% of a decode on CPU)."""
    return model.apply({"params": params}, method=Sam.get_dense_pe)


def image_context(model: Sam, params: Params, image_embedding: jax.Array,
                  image_pe: Optional[jax.Array] = None) -> Dict[str, jax.Array]:
    """The decoder's prompt-independent work on one image, for `decode_prompts(image_context=...)`
    (prompts without a mask input): see `modeling.image_context`. `SamPredictor` computes it
    once per image; it holds ~10 MB per image for the official models."""
    pe = dense_pe(model, params) if image_pe is None else image_pe
    return modeling_image_context(params, image_embedding, pe, model.config.decoder_num_heads)


def decode_prompts(model: Sam, params: Params, image_embedding: jax.Array,
                   point_coords: Optional[jax.Array] = None, point_labels: Optional[jax.Array] = None,
                   boxes: Optional[jax.Array] = None, mask_input: Optional[jax.Array] = None,
                   multimask_output: bool = True, image_pe: Optional[jax.Array] = None,
                   image_context: Optional[Dict[str, jax.Array]] = None) -> Tuple[jax.Array, jax.Array]:
    """Decodes B prompts against one image embedding (`Sam.decode`); arrays stay on the device.

    Args:
      image_embedding: (1, h, w, C) NHWC (e.g. `SamPredictor.image_embeddings[i]`).
      point_coords: (B, N, 2) float, (x, y) pixels of the MODEL-INPUT frame (use
        `SamPredictor.transform.apply_coords` or `transforms.apply_coords` to get there).
      point_labels: (B, N) int: 1 foreground, 0 background, -1 the official "not a point" token,
        PAD_LABEL for empty slots (masked out of attention: pad freely to a fixed N).
      boxes: (B, 4) float, (x0, y0, x1, y1) in the model-input frame.
      mask_input: (B, 4h, 4w) low-res mask LOGITS (a previous call's low_res_logits[:, k]).
      multimask_output: static; True gives 3 masks per prompt, False 1.
      image_pe: optional `dense_pe(model, params)`, computed here when None.
      image_context: optional `image_context(model, params, image_embedding)`: the same result
        with less work per call; only for prompts without mask_input.

    Returns:
      low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M). `transforms.upscale_masks`
      with `SamPredictor.upscale_tables(i)` turns the logits into full-size logits.
    """
    return model.apply({"params": params}, image_embedding, point_coords, point_labels, boxes, mask_input,
                       multimask_output, image_context, image_pe, method=Sam.decode)


# XLA:CPU (jaxlib 0.10) by default hands each dot, with the elementwise ops and reductions around
# it, to a YNNPACK "library fusion", which runs them one after another over whole tensors. Most of
# SAM runs better on XLA's own loop fusions: the decoder (~100 small dots among LayerNorms and
# softmaxes; same-run A/B on vit_b, 2 cores: predict_batch with 64 boxes 3.17 -> 2.73 s, AMG from
# an embedding 32.0 -> 27.4 s; one point within noise) and most of the encoder (see
# `encoder_stages`). `jit_tuned` (and `_TunedJit`) compile with these options.
CPU_XLA_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def cpu_compiler_options() -> Optional[Dict[str, str]]:
    """`CPU_XLA_OPTIONS` if this XLA knows them (checked once by a tiny compile), else None."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_XLA_OPTIONS).lower(np.zeros(1, np.float32)).compile()
    except Exception:  # a jax / XLA without the option (TypeError, JaxRuntimeError): its defaults
        return None
    return dict(CPU_XLA_OPTIONS)


def jit_tuned(fun, **kw):
    """`jax.jit(fun, **kw)`, compiled with `cpu_compiler_options()` when this XLA knows them."""
    opts = cpu_compiler_options()
    return jax.jit(fun, **kw, **({"compiler_options": opts} if opts else {}))


class _TunedJit:
    """`jit_tuned(fun, **kw)` created at the first use (the options check compiles, which should
    not happen at import). Attributes are the jitted function's."""

    def __init__(self, fun, **kw):
        self._fun, self._kw, self._jit = fun, kw, None
        functools.update_wrapper(self, fun)

    def _get(self):
        if self._jit is None:
            self._jit = jit_tuned(self._fun, **self._kw)
        return self._jit

    def __call__(self, *args, **kwargs):
        return self._get()(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("_fun", "_kw", "_jit"):  # not set yet (e.g. while copying): no recursion
            raise AttributeError(name)
        return getattr(self._get(), name)


_decode = _TunedJit(decode_prompts, static_argnames=("model", "multimask_output"))
_dense_pe = jax.jit(dense_pe, static_argnames=("model",))
_image_context = jax.jit(image_context, static_argnames=("model",))


@partial(_TunedJit, static_argnames=("return_logits", "width_window"))
def _upscale(low_res: jax.Array, rows, cols, return_logits: bool, width_window: int = 0) -> jax.Array:
    logits = upscale_masks(low_res, rows, cols, width_window)
    return logits if return_logits else logits > MASK_THRESHOLD


# --- The encoder as the predictor runs it. ---

def encoder_stages(model: Sam) -> Tuple[Tuple[int, int, bool], ...]:
    """(start, stop, xla_defaults) stages of the image encoder in half-blocks (see
    `Sam.encode_image_layers`): the attention half of each global block alone, with XLA's default
    options; everything between them in one stage each (vit_b: half-blocks 0-3, 4, 5-9, 10,
    11-15, 16, 17-21, 22, 23)."""
    cfg = model.config
    stages, start = [], 0
    for g in sorted(cfg.encoder_global_attn_indexes):
        if start < 2 * g:
            stages.append((start, 2 * g, False))
        stages.append((2 * g, 2 * g + 1, True))
        start = 2 * g + 1
    stages.append((start, 2 * cfg.encoder_depth, False))
    return tuple(stages)


def _encoder_stage(model: Sam, params: Params, x: jax.Array, start: int, stop: int) -> jax.Array:
    return model.apply({"params": params}, x, start, stop, method="encode_image_layers")


# On XLA:CPU most of the encoder runs faster on XLA's own fusions than on its YNNPACK library
# fusions (vit_b, 2 cores: a windowed block 837 -> 652 ms, where the 25 x 12 small attention
# products and softmaxes suffer most; the MLP 390 -> 316 ms), but the global blocks' chunked
# attention runs ~1.8x slower without them. One executable cannot mix the two, so on CPU the
# encoder runs as a chain of `encoder_stages`, each compiled with the options that suit it
# (whole encoder, same run: 11.7 -> 10.2 s).
_encode_stage_default = jax.jit(_encoder_stage, static_argnames=("model", "start", "stop"))
_encode_stage_no_ynn = _TunedJit(_encoder_stage, static_argnames=("model", "start", "stop"))
_encode_whole = jax.jit(lambda model, params, x: model.apply({"params": params}, x, method=Sam.encode_image),
                        static_argnums=(0,))


def _stage_params(params: Params, start: int, stop: int, depth: int) -> Params:
    enc = params["image_encoder"]
    keep = {f"blocks_{i}" for i in range(start // 2, (stop + 1) // 2)}
    if start == 0:
        keep |= {"patch_embed", "pos_embed"}
    if stop == 2 * depth:
        keep |= {k for k in enc if k.startswith("neck_")}
    return {"image_encoder": {k: v for k, v in enc.items() if k in keep}}


def encode_staged(model: Sam, params: Params, x: jax.Array) -> jax.Array:
    """`Sam.encode_image` on preprocessed images (B, S, S, 3) as `SamPredictor` runs it (call it as
    is, not inside your own jit): on CPU, when XLA knows the options (`cpu_compiler_options`),
    a chain of jitted `encoder_stages`, each compiled with the options it runs fastest with;
    elsewhere one jit. The same embeddings up to float rounding; each stage compiles once per
    batch size."""
    if "image_encoder" not in params:
        raise ValueError("params has no image_encoder subtree: expected a full SAM parameter tree")
    if jax.default_backend() != "cpu" or cpu_compiler_options() is None:
        return _encode_whole(model, params, x)
    depth = model.config.encoder_depth
    for start, stop, xla_defaults in encoder_stages(model):
        run = _encode_stage_default if xla_defaults else _encode_stage_no_ynn
        x = run(model, _stage_params(params, start, stop, depth), x, start=start, stop=stop)
    return x


_preprocess = jax.jit(preprocess_padded)


def _encode_split(model: Sam, params: Params, images: jax.Array, sizes: jax.Array) -> Tuple[jax.Array, ...]:
    emb = encode_staged(model, params, _preprocess(images, sizes))
    # One (1, h, w, C) array per image: the decoder then sees one shape whatever the batch was.
    return (emb,) if emb.shape[0] == 1 else tuple(emb[i:i + 1] for i in range(emb.shape[0]))


def decoder_params(params: Params) -> Params:
    """The part of `params` that decoding reads (prompt encoder and mask decoder): passing only
    these to a jitted decode halves the per-call cost of flattening the parameter tree. (The
    decoder and the upscaling stay two jitted calls: a new image-size bucket then recompiles only
    the cheap upscaling.)"""
    missing = [k for k in ("prompt_encoder", "mask_decoder") if k not in params]
    if missing:
        raise ValueError(f"params has no {' or '.join(missing)} subtree: expected a full SAM parameter tree")
    return {k: params[k] for k in ("prompt_encoder", "mask_decoder")}



def _pad_rows(x: np.ndarray, n: int, fill: float = 0.0) -> np.ndarray:
    """Pads axis 0 of x to n rows with `fill`."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.full((n - x.shape[0], *x.shape[1:]), fill, x.dtype)])
