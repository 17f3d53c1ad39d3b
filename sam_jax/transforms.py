"""Pre- and post-processing with the official numerics.

Host side (numpy + Pillow): resizing the image so its longest side is the model input size, and
scaling prompt coordinates accordingly. Device side (jax): normalising and padding, and turning
low-resolution mask logits back into masks at the original image size.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from .config import PIXEL_MEAN, PIXEL_STD


def get_preprocess_shape(old_h: int, old_w: int, long_side: int) -> Tuple[int, int]:
    """(new_h, new_w) with the longest side equal to `long_side`, rounded as the official code."""
    scale = long_side * 1.0 / max(old_h, old_w)
    return int(old_h * scale + 0.5), int(old_w * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with Pillow's bilinear (antialiased) resize.

    Exactly what the official `ResizeLongestSide.apply_image` does; a float resize on the device
    differs by +-1 on many pixels, so this stays on the host.
    """
    new_h, new_w = get_preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR))


def apply_coords(coords: np.ndarray, original_size: Tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 2) (x, y) pixels of the original image -> the resized frame, as float32."""
    old_h, old_w = original_size
    new_h, new_w = get_preprocess_shape(old_h, old_w, long_side)
    coords = np.array(coords, dtype=np.float64)
    coords[..., 0] *= new_w / old_w
    coords[..., 1] *= new_h / old_h
    return coords.astype(np.float32)


def apply_boxes(boxes: np.ndarray, original_size: Tuple[int, int], long_side: int) -> np.ndarray:
    """(..., 4) (x0, y0, x1, y1) boxes of the original image -> the resized frame."""
    boxes = np.asarray(boxes)
    return apply_coords(boxes.reshape(*boxes.shape[:-1], 2, 2), original_size, long_side).reshape(boxes.shape)


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """Resized RGB images (B, h, w, 3), uint8 or float in 0..255 -> normalised and zero-padded
    bottom/right to (B, image_size, image_size, 3) float32, the encoder's input."""
    x = (images.astype(jnp.float32) - jnp.asarray(PIXEL_MEAN, jnp.float32)) / jnp.asarray(PIXEL_STD, jnp.float32)
    h, w = x.shape[1:3]
    if h > image_size or w > image_size:
        raise ValueError(f"images of {h}x{w} do not fit the {image_size} model input; resize first")
    return jnp.pad(x, ((0, 0), (0, image_size - h), (0, image_size - w), (0, 0)))


def postprocess_masks(masks: jax.Array, input_size: Tuple[int, int], original_size: Tuple[int, int],
                      image_size: int) -> jax.Array:
    """Low-res logits (..., 4h, 4w) -> logits at the original size (..., H, W).

    Two bilinear steps, as the official code: up to the padded input size, crop the padding away,
    then to the original size. Both without antialiasing (the second step is a downsample for
    images under `image_size`, where an antialiased resize would flip thousands of pixels).
    """
    lead = masks.shape[:-2]
    x = jax.image.resize(masks, (*lead, image_size, image_size), method="linear", antialias=False)
    x = x[..., : input_size[0], : input_size[1]]
    return jax.image.resize(x, (*lead, *original_size), method="linear", antialias=False)
