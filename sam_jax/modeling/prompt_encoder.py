"""Prompt encoder: points, boxes and mask logits -> sparse tokens and a dense embedding.

Coordinates are pixels in the padded model-input frame (the 1024 x 1024 square for the official
models), x then y. Point labels: 1 foreground, 0 background, -1 "not a point" (the official padding
token, which takes part in attention) and PAD_LABEL (-10, a padding slot that is masked out of
attention entirely, used to pad prompts to a fixed bucket size without changing the answer).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import SAM_LN_EPS, Dtype, conv, gelu, layer_norm

PAD_LABEL = -10


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding; the (2, C/2) gaussian matrix is a checkpoint tensor."""

    num_pos_feats: int

    def setup(self) -> None:
        self.positional_encoding_gaussian_matrix = self.param(
            "positional_encoding_gaussian_matrix", nn.initializers.normal(1.0), (2, self.num_pos_feats)
        )

    def encode(self, coords: jax.Array) -> jax.Array:
        """coords in [0, 1]^2, (..., 2) as (x, y) -> (..., 2 * num_pos_feats) as [sin | cos]."""
        coords = 2.0 * coords - 1.0
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2.0 * math.pi * coords
        return jnp.concatenate([jnp.sin(coords), jnp.cos(coords)], axis=-1)

    def dense(self, h: int, w: int) -> jax.Array:
        """Encoding of every cell centre of an h x w grid: (h, w, C)."""
        ys = (jnp.arange(h, dtype=jnp.float32) + 0.5) / h
        xs = (jnp.arange(w, dtype=jnp.float32) + 0.5) / w
        grid = jnp.stack(jnp.broadcast_arrays(xs[None, :], ys[:, None]), axis=-1)
        return self.encode(grid)

    def with_coords(self, coords: jax.Array, image_size: Tuple[int, int]) -> jax.Array:
        """Pixel coordinates (..., 2) as (x, y) in an image of (H, W) -> (..., C)."""
        scale = jnp.array([image_size[1], image_size[0]], jnp.float32)
        return self.encode(coords.astype(jnp.float32) / scale)


class PromptEncoder(nn.Module):
    """Embeds prompts for the mask decoder.

    Args:
      embed_dim (int): width of every prompt token and of the dense embedding.
      image_embedding_size (int): side of the image-embedding grid (64).
      input_image_size (int): side of the padded model input (1024); coordinates live in it.
      mask_in_chans (int): hidden channels of the mask downscaling path (16).
    """

    embed_dim: int
    image_embedding_size: int
    input_image_size: int
    mask_in_chans: int
    dtype: Dtype = None

    def setup(self) -> None:
        c = self.embed_dim
        self.pe_layer = PositionEmbeddingRandom(c // 2)
        # Four type embeddings: negative point, positive point, box top-left, box bottom-right.
        self.point_embeddings = [nn.Embed(1, c) for _ in range(4)]
        self.not_a_point_embed = nn.Embed(1, c)
        self.no_mask_embed = nn.Embed(1, c)
        m = self.mask_in_chans
        self.mask_downscaling_0 = conv(m // 4, (2, 2), self.dtype, strides=(2, 2), padding="VALID")
        self.mask_downscaling_1 = layer_norm(SAM_LN_EPS, None, self.dtype)
        self.mask_downscaling_3 = conv(m, (2, 2), self.dtype, strides=(2, 2), padding="VALID")
        self.mask_downscaling_4 = layer_norm(SAM_LN_EPS, None, self.dtype)
        self.mask_downscaling_6 = conv(c, (1, 1), self.dtype)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the image-embedding grid, (h, w, C) NHWC without batch."""
        s = self.image_embedding_size
        return self.pe_layer.dense(s, s)

    def _embed_points(self, coords: jax.Array, labels: jax.Array, pad: bool) -> jax.Array:
        coords = coords.astype(jnp.float32) + 0.5  # pixel centres
        labels = labels.astype(jnp.int32)
        if pad:  # the official "not a point" token, appended when there is no box
            b = coords.shape[0]
            coords = jnp.concatenate([coords, jnp.zeros((b, 1, 2), coords.dtype)], axis=1)
            labels = jnp.concatenate([labels, -jnp.ones((b, 1), labels.dtype)], axis=1)
        s = self.input_image_size
        pe = self.pe_layer.with_coords(coords, (s, s))
        lab = labels[..., None]
        pe = jnp.where((lab == -1) | (lab == PAD_LABEL), 0.0, pe)
        pe = pe + jnp.where(lab == -1, self.not_a_point_embed.embedding[0], 0.0)
        pe = pe + jnp.where(lab == 0, self.point_embeddings[0].embedding[0], 0.0)
        pe = pe + jnp.where(lab == 1, self.point_embeddings[1].embedding[0], 0.0)
        return pe

    def _embed_boxes(self, boxes: jax.Array) -> jax.Array:
        corners = boxes.astype(jnp.float32).reshape(-1, 2, 2) + 0.5
        s = self.input_image_size
        pe = self.pe_layer.with_coords(corners, (s, s))
        corner_type = jnp.stack([self.point_embeddings[2].embedding[0], self.point_embeddings[3].embedding[0]])
        return pe + corner_type

    def _embed_masks(self, masks: jax.Array) -> jax.Array:
        x = masks[..., None]
        x = gelu(self.mask_downscaling_1(self.mask_downscaling_0(x)))
        x = gelu(self.mask_downscaling_4(self.mask_downscaling_3(x)))
        return self.mask_downscaling_6(x)

    def __call__(
        self,
        point_coords: Optional[jax.Array] = None,
        point_labels: Optional[jax.Array] = None,
        boxes: Optional[jax.Array] = None,
        mask_inputs: Optional[jax.Array] = None,
    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """Embeds prompts; any of them may be None.

        Args:
          point_coords: (B, N, 2) float, (x, y) pixels in the model-input frame.
          point_labels: (B, N) int, 1 / 0 / -1 / PAD_LABEL.
          boxes: (B, 4) float, (x0, y0, x1, y1) in the model-input frame.
          mask_inputs: (B, 4h, 4w) mask LOGITS (e.g. a previous call's low-res output).

        Returns:
          sparse (B, T, C), dense (B, h, w, C) NHWC, and token_valid (B, T) bool: False for
          PAD_LABEL slots, which the decoder masks out of attention.
        """
        if (point_coords is None) != (point_labels is None):
            raise ValueError("point_coords and point_labels must be given together")
        bs = next((x.shape[0] for x in (point_coords, boxes, mask_inputs) if x is not None), 1)
        c = self.embed_dim
        sparse = [jnp.zeros((bs, 0, c), jnp.float32)]
        valid = [jnp.zeros((bs, 0), bool)]
        if point_coords is not None:
            pad = boxes is None
            sparse.append(self._embed_points(point_coords, point_labels, pad))
            valid.append(point_labels.astype(jnp.int32) != PAD_LABEL)
            if pad:
                valid.append(jnp.ones((bs, 1), bool))
        if boxes is not None:
            sparse.append(self._embed_boxes(boxes))
            valid.append(jnp.ones((bs, 2), bool))
        if mask_inputs is not None:
            dense = self._embed_masks(mask_inputs)
        else:
            s = self.image_embedding_size
            dense = jnp.broadcast_to(self.no_mask_embed.embedding[0], (bs, s, s, c))
        return jnp.concatenate(sparse, axis=1), dense, jnp.concatenate(valid, axis=1)
