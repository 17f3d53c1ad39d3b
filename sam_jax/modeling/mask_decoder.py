"""Mask decoder: two-way transformer, output upscaling, hypernetwork MLPs and the IoU head."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import SAM_LN_EPS, Dtype, MatmulLayerNorm, MLP, gelu
from .transformer import TwoWayTransformer

# Decoders this narrow or narrower upscale in the channels-first layout (see MaskDecoder).
CHANNELS_FIRST_MAX_DIM = 64


class MaskDecoder(nn.Module):
    """Predicts mask logits and their IoU from an image embedding and prompt tokens.

    Entry points: `__call__` (the official forward), or its two halves, `predict_tokens` (the
    two-way transformer and the heads, for every prompt) then `upscale` (the output upscaling and
    the hypernetwork product, for any subset of the prompts: the automatic mask generator upscales
    only the masks that pass its IoU filter).

    Args:
      transformer_dim (int): channel width C (256).
      transformer_depth / transformer_num_heads / transformer_mlp_dim: the two-way transformer.
      num_multimask_outputs (int): masks output when disambiguating (3); one more token is the
        single-mask output.
      iou_head_depth (int), iou_head_hidden_dim (int): the IoU prediction MLP.
    """

    transformer_dim: int
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: Dtype = None

    def setup(self) -> None:
        c, dt = self.transformer_dim, self.dtype
        n_mask = self.num_multimask_outputs + 1
        self.iou_token = nn.Embed(1, c)
        self.mask_tokens = nn.Embed(n_mask, c)
        self.transformer = TwoWayTransformer(
            self.transformer_depth, c, self.transformer_num_heads, self.transformer_mlp_dim, dtype=dt
        )
        # The two ConvTranspose2d(kernel 2, stride 2) of the official output_upscaling, as matmuls
        # (their taps do not overlap); see `upscale` for the layouts.
        if c <= CHANNELS_FIRST_MAX_DIM:
            self.output_upscaling_0 = _ConvTranspose2x2(c, c // 4, dt, "nhwc->nchw")
            self.output_upscaling_1 = nn.LayerNorm(
                SAM_LN_EPS, use_fast_variance=False, reduction_axes=1, feature_axes=1, dtype=dt
            )
            self.output_upscaling_3 = _ConvTranspose2x2(c // 4, c // 8, dt, "nchw")
        else:
            self.output_upscaling_0 = _ConvTranspose2x2(c, c // 4, dt)
            self.output_upscaling_1 = MatmulLayerNorm(SAM_LN_EPS, dt)
            self.output_upscaling_3 = _ConvTranspose2x2(c // 4, c // 8, dt)
        self.output_hypernetworks_mlps = [MLP(c, c // 8, 3, dtype=dt) for _ in range(n_mask)]
        self.iou_prediction_head = MLP(self.iou_head_hidden_dim, n_mask, self.iou_head_depth, dtype=dt)

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        token_valid: Optional[jax.Array] = None,
        image_context: Optional[Dict[str, jax.Array]] = None,
    ) -> Tuple[jax.Array, jax.Array]:
        """image_embeddings (B or 1, h, w, C); image_pe (h, w, C); sparse (B, T, C); dense (B, h, w, C).

        image_context: `transformer.image_context` of a (1, h, w, C) embedding, for prompts
        without a mask input; image_embeddings and dense_prompt_embeddings are then not read.

        Returns low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M); M is
        num_multimask_outputs when multimask_output, else 1.
        """
        iou_pred, hyper_in, image_tokens = self.predict_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            multimask_output,
            token_valid,
            image_context,
        )
        return self.upscale(image_tokens, hyper_in), iou_pred

    def predict_tokens(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        token_valid: Optional[jax.Array] = None,
        image_context: Optional[Dict[str, jax.Array]] = None,
    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """`__call__` up to the output upscaling (same arguments).

        Returns IoU predictions (B, M), the hypernetwork outputs (B, M, C/8) of the M returned
        masks, and the image tokens after the transformer (B, h, w, C) NHWC: `upscale` turns rows
        of the last two into mask logits.
        """
        c = self.transformer_dim
        n_mask = self.num_multimask_outputs + 1
        b = sparse_prompt_embeddings.shape[0]
        iou_token = self.iou_token.embedding
        mask_tokens = self.mask_tokens.embedding
        out_tokens = jnp.broadcast_to(jnp.concatenate([iou_token, mask_tokens]), (b, 1 + n_mask, c))
        tokens = jnp.concatenate([out_tokens, sparse_prompt_embeddings.astype(out_tokens.dtype)], axis=1)
        if token_valid is not None:
            token_valid = jnp.concatenate([jnp.ones((b, 1 + n_mask), bool), token_valid], axis=1)

        # One embedding may serve a whole batch of prompts (the official repeat_interleave).
        if image_context is None:
            src = image_embeddings + dense_prompt_embeddings
        else:
            src = image_context["src"]  # embedding + no-mask embedding, batch 1
        hh, ww = src.shape[1:3]
        # Only the IoU token and the mask tokens have outputs that are read: the final attention
        # runs for those alone (the prompt tokens' outputs are discarded officially).
        hs, src = self.transformer(
            src,
            jnp.reshape(image_pe, (1, hh, ww, c)),
            tokens,
            token_valid,
            image_context,
            output_tokens=tuple(range(1 + n_mask)),
        )
        iou_token_out = hs[:, 0]
        mask_tokens_out = hs[:, 1 : 1 + n_mask]

        # Only the masks that are returned (officially all n_mask are computed, then sliced): the
        # hypernetwork MLPs of the others run only while initialising, to create their params.
        sl = slice(1, None) if multimask_output else slice(0, 1)
        wanted = range(n_mask)[sl]
        hyper = {
            i: self.output_hypernetworks_mlps[i](mask_tokens_out[:, i])
            for i in (range(n_mask) if self.is_initializing() else wanted)
        }
        hyper_in = jnp.stack([hyper[i] for i in wanted], axis=1)  # (B, M, C/8)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return iou_pred[:, sl], hyper_in, src.reshape(b, hh, ww, c)

    def upscale(self, image_tokens: jax.Array, hyper_in: jax.Array) -> jax.Array:
        """The output upscaling and the hypernetwork product: image tokens (K, h, w, C) NHWC and
        hypernetwork outputs (K, M, C/8) (rows of `predict_tokens`' outputs, any K) -> low-res
        mask logits (K, M, 4h, 4w)."""
        k, hh, ww = image_tokens.shape[:3]
        if self.transformer_dim <= CHANNELS_FIRST_MAX_DIM:
            # Few upscaled channels (C/8 <= 8): pixels minor, (K, C', 2h, 2w) then (K, C/8, 4h, 4w),
            # so the norm, the GELUs and their gradients run over whole pixel rows instead of rows of
            # C/8 floats that XLA:CPU vectorises badly (a 64-px model's train step: 106 -> 97 ms).
            x = self.output_upscaling_0(image_tokens)  # (K, C/4, 2h, 2w)
            x = gelu(self.output_upscaling_1(x))
            upscaled = gelu(self.output_upscaling_3(x))  # (K, C/8, 4h, 4w)
            return jnp.einsum("bmc,bcyx->bmyx", hyper_in, upscaled.astype(hyper_in.dtype))
        # The pixels stay in the blocked layout, (K, h, w, a, b', a2, b2, C/8) = pixel
        # (4h + 2a + a2, 4w + 2b' + b2), until the final product with the hypernetwork vectors,
        # which interleaves only M masks.
        x = self.output_upscaling_0(image_tokens)  # (K, h, w, 2, 2, C/4)
        x = gelu(self.output_upscaling_1(x))
        upscaled = gelu(self.output_upscaling_3(x))
        masks = jnp.einsum("bmc,bhwikjlc->bmhijwkl", hyper_in, upscaled.astype(hyper_in.dtype))
        return masks.reshape(k, masks.shape[1], 4 * hh, 4 * ww)


class _ConvTranspose2x2(nn.Module):
    """`nn.ConvTranspose(features, (2, 2), strides=(2, 2), padding="VALID")` (same parameters)
    written as a matmul. Layout "blocked": (..., C_in) -> (..., 2, 2, features), where
    [..., a, b, :] is output pixel (2i + a, 2j + b); "nhwc->nchw": (n, h, w, C_in) ->
    (n, features, 2h, 2w); "nchw": (n, C_in, h, w) -> (n, features, 2h, 2w). Flax applies its
    kernel spatially flipped (the converter stores torch's weight that way), hence the [::-1, ::-1]."""

    in_features: int
    features: int
    dtype: Dtype = None
    layout: str = "blocked"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (2, 2, self.in_features, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        kernel = kernel[::-1, ::-1]
        if self.layout == "blocked":
            return jnp.einsum("...c,abco->...abo", x, kernel) + bias
        spec = {"nhwc->nchw": "nyxc,abco->noyaxb", "nchw": "ncyx,abco->noyaxb"}[self.layout]
        y = jnp.einsum(spec, x, kernel) + bias[:, None, None, None, None]
        return y.reshape(y.shape[0], self.features, 2 * y.shape[2], 2 * y.shape[4])
