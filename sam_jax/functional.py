"""The pure entry points of prediction, and the bucket sizes that keep their shapes fixed.

`encode_images` and `decode_prompts` (with `dense_pe` and `image_context`) are pure functions for
use inside your own `jax.jit`; they work in the MODEL-INPUT frame (the S x S square the image is
resized into, S = 1024 officially), with NHWC embeddings. `SamPredictor` jits them and wraps them
with original-image coordinates and numpy outputs; how it compiles them for the backend (XLA:CPU
options, the encoder's stages) is `sam_jax.backend`.

Compilation discipline of `SamPredictor` (what compiles when):
  * encoder: once per number of images in a call (`set_image` is one image). Images are resized on
    the host with Pillow, zero-padded to S x S uint8, and their (h, w) travels as data, so image
    size never recompiles;
  * decoder: once per (prompt kinds present, multimask_output, point bucket, prompt bucket). Point
    sets are padded to `point_bucket` slots with `PAD_LABEL`, which the model masks out of
    attention: the result equals the unpadded computation. Batches of prompts run in chunks of
    `prompts_per_call` prompts (MAX_PROMPTS_PER_CALL up to 64 point slots, fewer above), each
    padded to a power of two;
  * mask upscaling: once per (padded output size, prompt bucket, masks per prompt, return_logits).
    Output sides are padded to `size_bucket` sides and sliced on the host; the crop + two bilinear
    resizes travel as interpolation tables (arrays), so images whose sides fall in the same
    buckets share one compilation.
`SamPredictor` compiles the decoder programs of 1 to 16 points (with and without a box) and the
upscaling of each new image size ahead, on a background thread (its `compile_ahead`), so that an
interactive session meets no compilation after its first `predict`.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from . import inputs
from .build import Params
from .modeling import Sam
from .modeling import image_context as modeling_image_context
from .transforms import pad_to_square, preprocess_padded, resize_longest_side

# Point slots per prompt: 1, 4, 16, 64 (x4), then 64 * sqrt(2)^k rounded up to a multiple of 16
# (96, 128, 192, 256, 368, 512, 736, 1024, 1456, 2048, 2912, 4096, 5808, 8192, ...). The decoder's
# attention work grows with the number of prompt tokens (see modeling.transformer.Attention), so
# the most common call, one click, gets its own bucket: 4 slots cost ~14% more decoder work than 1
# for vit_b on CPU. Above 64 slots the tokens' self-attention dominates and its memory grows with
# the square of the slots (XLA's temporaries for one vit_b prompt: 21 MB at 16 slots, 342 MB at
# 1024, 2.1 GB at 4096, 3.6 GB at 5808), so the steps shrink to sqrt(2): padding then costs at
# most ~2x the memory of the unpadded prompt, where x4 steps cost up to 16x (4097 points padded
# to 16384 slots: 16 GB of temporaries on the tiny model).
MIN_POINT_SLOTS = 1
FINE_POINT_SLOTS = 64
MAX_PROMPTS_PER_CALL = 64
# Prompts x point slots in one decoder call: `prompts_per_call` keeps a chunk of predict_batch
# within what one prompt of that many slots costs times MAX_PROMPTS_PER_CALL / FINE_POINT_SLOTS,
# so its memory grows with the slots as predict's does instead of 64 times faster.
MAX_SLOTS_PER_CALL = MAX_PROMPTS_PER_CALL * FINE_POINT_SLOTS
# Output sides of the mask upscaling: 256 * sqrt(2)^k rounded up to a multiple of 16 (256, 368,
# 512, 736, 1024, 1456, 2048, 2912, 4096, 5808, 8192, ...): at most ~2x the pixels of the image.
SIZE_BUCKET_BASE = 256


def _sqrt2_bucket(n: int, base: int) -> int:
    """The smallest base * sqrt(2)^k (k >= 0), rounded up to a multiple of 16, that is >= n."""
    k = 0
    while True:
        b = -(-math.ceil(base * 2 ** (k / 2)) // 16) * 16
        if n <= b:
            return b
        k += 1


def point_bucket(n: int) -> int:
    """Number of point slots a prompt with n points is padded to (see FINE_POINT_SLOTS)."""
    if n > FINE_POINT_SLOTS:
        return _sqrt2_bucket(n, FINE_POINT_SLOTS)
    b = MIN_POINT_SLOTS
    while n > b:
        b *= 4
    return b


def prompts_per_call(n_slots: int) -> int:
    """Prompts of n_slots point slots each that one decoder call takes: MAX_PROMPTS_PER_CALL up to
    FINE_POINT_SLOTS slots, then the largest power of 2 within MAX_SLOTS_PER_CALL (at least 1)."""
    fit = max(1, MAX_SLOTS_PER_CALL // max(n_slots, 1))
    return min(MAX_PROMPTS_PER_CALL, 1 << (fit.bit_length() - 1))


def prompt_bucket(b: int) -> int:
    """Number of prompts a chunk of b <= MAX_PROMPTS_PER_CALL prompts is padded to (power of 2)."""
    return min(1 << max(b - 1, 0).bit_length(), MAX_PROMPTS_PER_CALL)


def size_bucket(n: int) -> int:
    """Padded output side for an image side of n pixels (see SIZE_BUCKET_BASE)."""
    return _sqrt2_bucket(n, SIZE_BUCKET_BASE)


# --- Pure functions: usable inside your own jax.jit. ---


def prepare_images(
    images: Sequence[Any], image_size: int, image_format: str = "RGB"
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
    depend on the image size. `prepare_images` makes the inputs on the host. `SamPredictor` runs
    this computation as `sam_jax.backend` says it runs fastest (on XLA:CPU, a chain of stages).
    """
    return model.apply({"params": params}, preprocess_padded(images, sizes), method="encode_image")


def encode_images_hq(model: Sam, params: Params, images: jax.Array, sizes: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """SAM-HQ (`model.config.hq`): `encode_images`' inputs -> the embeddings (B, S/16, S/16, C)
    and the per-image HQ features (B, S/4, S/4, C/8) that `decode_prompts` takes as `hq_features`,
    both NHWC float32 (`Sam.encode_image_hq`)."""
    return model.apply({"params": params}, preprocess_padded(images, sizes), method="encode_image_hq")


def dense_pe(model: Sam, params: Params) -> jax.Array:
    """The positional encoding of the embedding grid, (h, w, C): the same for every image and
    prompt, so `decode_prompts` can take it precomputed (its sin/cos are ~10% of a decode on CPU)."""
    return model.apply({"params": params}, method="get_dense_pe")


def image_context(
    model: Sam, params: Params, image_embedding: jax.Array, image_pe: Optional[jax.Array] = None
) -> Dict[str, jax.Array]:
    """The decoder's prompt-independent work on one image, for `decode_prompts(image_context=...)`
    (prompts without a mask input): see `modeling.image_context`. `SamPredictor` computes it
    once per image; it holds ~10 MB per image for the official models."""
    pe = dense_pe(model, params) if image_pe is None else image_pe
    return modeling_image_context(params, image_embedding, pe, model.config.decoder_num_heads)


def decode_prompts(
    model: Sam,
    params: Params,
    image_embedding: jax.Array,
    point_coords: Optional[jax.Array] = None,
    point_labels: Optional[jax.Array] = None,
    boxes: Optional[jax.Array] = None,
    mask_input: Optional[jax.Array] = None,
    multimask_output: bool = True,
    image_pe: Optional[jax.Array] = None,
    image_context: Optional[Dict[str, jax.Array]] = None,
    hq_features: Optional[jax.Array] = None,
    hq_token_only: bool = False,
) -> Tuple[jax.Array, jax.Array]:
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
      hq_features: SAM-HQ only, required: the image's `encode_images_hq` HQ features (1, 4h, 4w,
        C/8) (e.g. `SamPredictor.hq_features[i]`).
      hq_token_only: SAM-HQ only, static: the HQ mask alone instead of SAM's + HQ's.

    Returns:
      low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M) (SAM-HQ: M = 1).
      `transforms.upscale_masks` with `SamPredictor.upscale_tables(i)` turns the logits into
      full-size logits.
    """
    return model.apply(
        {"params": params},
        image_embedding,
        point_coords,
        point_labels,
        boxes,
        mask_input,
        multimask_output,
        image_context,
        image_pe,
        hq_features,
        hq_token_only,
        method="decode",
    )
