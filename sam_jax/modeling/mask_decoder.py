"""Mask decoder: two-way transformer, output upscaling, hypernetwork MLPs and the IoU head."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from .common import SAM_LN_EPS, Dtype, MatmulLayerNorm, MLP, conv, gelu, product, stream_dtype
from .transformer import TwoWayTransformer

# Decoders this narrow or narrower upscale in the channels-first layout (see MaskDecoder).
CHANNELS_FIRST_MAX_DIM = 64


# The parts SAM-HQ adds to SAM's mask decoder (`MaskDecoder(hq=True)`), by their names in both the
# official and our parameter trees (ours suffix a layer index: `compress_vit_feat_0`).
HQ_PARTS = ("hf_token", "hf_mlp", "compress_vit_feat", "embedding_encoder", "embedding_maskfeature")


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
      hq (bool): SAM-HQ's decoder (`MaskDecoderHQ`): one more output token (`hf_token`, its MLP
        `hf_mlp`) whose mask reads the upscaled image tokens refined by `embedding_maskfeature`
        plus per-image HQ features (`hq_features`: `embedding_encoder` of the image embedding +
        `compress_vit_feat` of the ViT tokens after the first global block). One mask per prompt:
        SAM's (mask 0, or with multimask_output the best of the others by predicted IoU) plus
        the HQ mask, or the HQ mask alone (`hq_token_only`). False: SAM's decoder, unchanged.
      vit_dim (int): the ViT width of those intermediate tokens (hq only).
    """

    transformer_dim: int
    transformer_depth: int = 2
    transformer_num_heads: int = 8
    transformer_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    dtype: Dtype = None
    hq: bool = False
    vit_dim: int = 0

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
                SAM_LN_EPS, use_fast_variance=False, reduction_axes=1, feature_axes=1, dtype=stream_dtype(dt)
            )
            self.output_upscaling_3 = _ConvTranspose2x2(c // 4, c // 8, dt, "nchw")
        else:
            self.output_upscaling_0 = _ConvTranspose2x2(c, c // 4, dt)
            self.output_upscaling_1 = MatmulLayerNorm(SAM_LN_EPS, dt)
            self.output_upscaling_3 = _ConvTranspose2x2(c // 4, c // 8, dt)
        self.output_hypernetworks_mlps = [MLP(c, c // 8, 3, dtype=dt) for _ in range(n_mask)]
        self.iou_prediction_head = MLP(self.iou_head_hidden_dim, n_mask, self.iou_head_depth, dtype=dt)
        if self.hq:
            if self.vit_dim <= 0:
                raise ValueError(f"vit_dim must be the ViT width (> 0) when hq=True, got {self.vit_dim}")
            # Names follow MaskDecoderHQ's nn.Sequential indices (GELUs at 2 hold no parameters).
            self.hf_token = nn.Embed(1, c)
            self.hf_mlp = MLP(c, c // 8, 3, dtype=dt)
            self.compress_vit_feat_0 = _ConvTranspose2x2(self.vit_dim, c, dt)
            self.compress_vit_feat_1 = MatmulLayerNorm(SAM_LN_EPS, dt)
            self.compress_vit_feat_3 = _ConvTranspose2x2(c, c // 8, dt)
            self.embedding_encoder_0 = _ConvTranspose2x2(c, c // 4, dt)
            self.embedding_encoder_1 = MatmulLayerNorm(SAM_LN_EPS, dt)
            self.embedding_encoder_3 = _ConvTranspose2x2(c // 4, c // 8, dt)
            self.embedding_maskfeature_0 = _conv3x3(c // 4, dt)
            self.embedding_maskfeature_1 = MatmulLayerNorm(SAM_LN_EPS, dt)
            self.embedding_maskfeature_3 = _conv3x3(c // 8, dt)

    def __call__(
        self,
        image_embeddings: jax.Array,
        image_pe: jax.Array,
        sparse_prompt_embeddings: jax.Array,
        dense_prompt_embeddings: jax.Array,
        multimask_output: bool,
        token_valid: Optional[jax.Array] = None,
        image_context: Optional[Dict[str, jax.Array]] = None,
        interm_embeddings: Optional[jax.Array] = None,
        hq_token_only: bool = False,
    ) -> Tuple[jax.Array, jax.Array]:
        """image_embeddings (B or 1, h, w, C); image_pe (h, w, C); sparse (B, T, C); dense (B, h, w, C).

        image_context: `transformer.image_context` of a (1, h, w, C) embedding, for prompts
        without a mask input; image_embeddings and dense_prompt_embeddings are then not read
        (hq=False; the HQ features always read image_embeddings).
        interm_embeddings (hq only, required): the ViT tokens after its first global block,
        (B or 1, h, w, vit_dim) NHWC, like image_embeddings. hq_token_only (static, hq only): the
        HQ mask alone instead of SAM's + HQ's.

        Returns low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M); M is
        num_multimask_outputs when multimask_output, else 1; with hq, M is 1 (see `hq`).
        """
        if self.hq:
            hq_features = self.hq_features(image_embeddings, interm_embeddings)
        else:
            self._check_not_hq(interm_embeddings=interm_embeddings, hq_token_only=hq_token_only)
            hq_features = None
        iou_pred, hyper_in, image_tokens = self.predict_tokens(
            image_embeddings,
            image_pe,
            sparse_prompt_embeddings,
            dense_prompt_embeddings,
            multimask_output,
            token_valid,
            image_context,
        )
        if hq_features is None:
            return self.upscale(image_tokens, hyper_in), iou_pred
        return self.upscale(image_tokens, hyper_in, hq_features, hq_token_only), iou_pred

    def _check_not_hq(self, **given) -> None:
        bad = [k for k, v in given.items() if v is not None and v is not False]
        if bad:
            raise ValueError(f"{' and '.join(bad)}: only for a SAM-HQ decoder (hq=True); this one has hq=False")

    def hq_features(self, image_embeddings: jax.Array, interm_embeddings: Optional[jax.Array]) -> jax.Array:
        """SAM-HQ's per-image features (hq only): `embedding_encoder(image_embeddings)` +
        `compress_vit_feat(interm_embeddings)`. image_embeddings (B, h, w, C) and
        interm_embeddings (B, h, w, vit_dim), the ViT tokens after its first global block, both
        NHWC -> (B, 4h, 4w, C/8) NHWC, what `upscale` takes as hq_features. It depends on the
        image only: compute it once per image."""
        if not self.hq:
            raise ValueError("hq_features: only for a SAM-HQ decoder (hq=True); this one has hq=False")
        if interm_embeddings is None:
            raise ValueError(
                "interm_embeddings is required by a SAM-HQ decoder (the ViT tokens after its first global block)"
            )
        want = (*image_embeddings.shape[:3], self.vit_dim)
        if image_embeddings.ndim != 4 or tuple(interm_embeddings.shape) != want:
            raise ValueError(
                f"interm_embeddings must have shape {want} (B, h, w, vit_dim) NHWC for image_embeddings "
                f"of shape {tuple(image_embeddings.shape)}, got {tuple(interm_embeddings.shape)}"
            )
        e = self.embedding_encoder_0(image_embeddings)  # (B, h, w, 2, 2, C/4), blocked
        e = self.embedding_encoder_3(gelu(self.embedding_encoder_1(e)))  # (B, h, w, 2, 2, 2, 2, C/8)
        v = self.compress_vit_feat_0(interm_embeddings)
        v = self.compress_vit_feat_3(gelu(self.compress_vit_feat_1(v)))
        return _unblock(e + v)

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
        """`__call__` up to the output upscaling (same arguments, less the HQ ones).

        Returns IoU predictions (B, M), the hypernetwork outputs (B, M, C/8) of the M returned
        masks, and the image tokens after the transformer (B, h, w, C) NHWC: `upscale` turns rows
        of the last two into mask logits. With hq: IoU (B, 1) (SAM's, of the chosen mask) and
        hypernetwork outputs (B, 2, C/8): the chosen SAM mask's, then the HQ token's.
        """
        c = self.transformer_dim
        n_mask = self.num_multimask_outputs + 1
        n_out = 1 + n_mask + int(self.hq)  # iou token, mask tokens, SAM-HQ's hf_token
        b = sparse_prompt_embeddings.shape[0]
        out_tokens = [self.iou_token.embedding, self.mask_tokens.embedding]
        if self.hq:
            out_tokens.append(self.hf_token.embedding)
        out_tokens = jnp.broadcast_to(jnp.concatenate(out_tokens), (b, n_out, c))
        if stream_dtype(self.dtype) is not None:  # a compute dtype: the tokens in its stream dtype
            out_tokens = out_tokens.astype(stream_dtype(self.dtype))
        tokens = jnp.concatenate([out_tokens, sparse_prompt_embeddings.astype(out_tokens.dtype)], axis=1)
        if token_valid is not None:
            token_valid = jnp.concatenate([jnp.ones((b, n_out), bool), token_valid], axis=1)

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
            output_tokens=tuple(range(n_out)),
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
        iou_pred = self.iou_prediction_head(iou_token_out)[:, sl]
        image_tokens = src.reshape(b, hh, ww, c)
        if not self.hq:
            return iou_pred, hyper_in, image_tokens
        if multimask_output:
            # SAM-HQ keeps the one multimask output of highest predicted IoU (the first on ties).
            best = jnp.argmax(iou_pred, axis=1)[:, None]
            iou_pred = jnp.take_along_axis(iou_pred, best, axis=1)
            hyper_in = jnp.take_along_axis(hyper_in, best[:, :, None], axis=1)
        hyper_hq = self.hf_mlp(hs[:, 1 + n_mask])[:, None]
        return iou_pred, jnp.concatenate([hyper_in, hyper_hq.astype(hyper_in.dtype)], axis=1), image_tokens

    def upscale(
        self,
        image_tokens: jax.Array,
        hyper_in: jax.Array,
        hq_features: Optional[jax.Array] = None,
        hq_token_only: bool = False,
    ) -> jax.Array:
        """The output upscaling and the hypernetwork product: image tokens (K, h, w, C) NHWC and
        hypernetwork outputs (K, M, C/8) (rows of `predict_tokens`' outputs, any K) -> low-res
        mask logits (K, M, 4h, 4w).

        hq only: hq_features (1 or K, 4h, 4w, C/8) NHWC from `hq_features` (required: the one image
        of every row, or each row's own) and hq_token_only (static); M is 1: SAM's mask (row 0 of
        hyper_in) + the HQ mask (row 1), or the HQ mask alone."""
        if not self.hq:
            self._check_not_hq(hq_features=hq_features, hq_token_only=hq_token_only)
            return self._mask_product(hyper_in, self._upscaled(image_tokens))
        k, hh, ww = image_tokens.shape[:3]
        want = (4 * hh, 4 * ww, self.transformer_dim // 8)
        if (
            hq_features is None
            or hq_features.ndim != 4
            or hq_features.shape[0] not in (1, k)
            or hq_features.shape[1:] != want
        ):
            got = None if hq_features is None else tuple(hq_features.shape)
            raise ValueError(
                f"hq_features must be `hq_features(...)`, of shape (1 or {k}, {want[0]}, {want[1]}, "
                f"{want[2]}) NHWC, got {got}"
            )
        upscaled = self._upscaled(image_tokens)
        # embedding_maskfeature refines SAM's upscaled tokens with 3x3 convolutions: pixel-major.
        f = self._upscaled_nhwc(upscaled)  # (K, 4h, 4w, C/8)
        f = self.embedding_maskfeature_0(f)
        f = self.embedding_maskfeature_3(gelu(self.embedding_maskfeature_1(f)))
        f = f + hq_features.astype(f.dtype)
        masks = product(jnp.einsum, "bc,byxc->byx", hyper_in[:, 1], f.astype(hyper_in.dtype), dtype=self.dtype)[:, None]
        if hq_token_only:
            return masks
        return self._mask_product(hyper_in[:, :1], upscaled) + masks

    def _upscaled(self, image_tokens: jax.Array) -> jax.Array:
        """The official output_upscaling of image tokens (K, h, w, C): (K, C/8, 4h, 4w)
        channels-first for narrow decoders, else blocked (K, h, w, 2, 2, 2, 2, C/8) (see
        `_mask_product`)."""
        if self.transformer_dim <= CHANNELS_FIRST_MAX_DIM:
            # Few upscaled channels (C/8 <= 8): pixels minor, (K, C', 2h, 2w) then (K, C/8, 4h, 4w),
            # so the norm, the GELUs and their gradients run over whole pixel rows instead of rows of
            # C/8 floats that XLA:CPU vectorises badly (a 64-px model's train step: 106 -> 97 ms).
            x = self.output_upscaling_0(image_tokens)  # (K, C/4, 2h, 2w)
            x = gelu(self.output_upscaling_1(x))
            return gelu(self.output_upscaling_3(x))  # (K, C/8, 4h, 4w)
        # The pixels stay in the blocked layout, (K, h, w, a, b', a2, b2, C/8) = pixel
        # (4h + 2a + a2, 4w + 2b' + b2), until the final product with the hypernetwork vectors,
        # which interleaves only M masks.
        x = self.output_upscaling_0(image_tokens)  # (K, h, w, 2, 2, C/4)
        x = gelu(self.output_upscaling_1(x))
        return gelu(self.output_upscaling_3(x))

    def _upscaled_nhwc(self, upscaled: jax.Array) -> jax.Array:
        """`_upscaled`'s output in NHWC, (K, 4h, 4w, C/8)."""
        if self.transformer_dim <= CHANNELS_FIRST_MAX_DIM:
            return upscaled.transpose(0, 2, 3, 1)
        return _unblock(upscaled)

    def _mask_product(self, hyper_in: jax.Array, upscaled: jax.Array) -> jax.Array:
        """Hypernetwork outputs (K, M, C/8) . `_upscaled` -> mask logits (K, M, 4h, 4w)."""
        if self.transformer_dim <= CHANNELS_FIRST_MAX_DIM:
            return product(jnp.einsum, "bmc,bcyx->bmyx", hyper_in, upscaled.astype(hyper_in.dtype), dtype=self.dtype)
        k, hh, ww = upscaled.shape[:3]
        masks = product(
            jnp.einsum, "bmc,bhwikjlc->bmhijwkl", hyper_in, upscaled.astype(hyper_in.dtype), dtype=self.dtype
        )
        return masks.reshape(k, masks.shape[1], 4 * hh, 4 * ww)


def _unblock(x: jax.Array) -> jax.Array:
    """Two blocked 2x2 upscalings (K, h, w, a, b, a2, b2, C), pixel (4h + 2a + a2, 4w + 2b + b2),
    -> NHWC (K, 4h, 4w, C)."""
    k, hh, ww, c = x.shape[0], x.shape[1], x.shape[2], x.shape[-1]
    return x.transpose(0, 1, 3, 5, 2, 4, 6, 7).reshape(k, 4 * hh, 4 * ww, c)


def _conv3x3(features: int, dtype: Dtype) -> nn.Conv:
    """torch's `nn.Conv2d(in, features, 3, 1, 1)` (with bias) in NHWC."""
    return conv(features, (3, 3), dtype, padding=((1, 1), (1, 1)))


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
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=stream_dtype(self.dtype))
        kernel = kernel[::-1, ::-1]
        if self.layout == "blocked":
            return product(jnp.einsum, "...c,abco->...abo", x, kernel, dtype=self.dtype) + bias
        spec = {"nhwc->nchw": "nyxc,abco->noyaxb", "nchw": "ncyx,abco->noyaxb"}[self.layout]
        y = product(jnp.einsum, spec, x, kernel, dtype=self.dtype) + bias[:, None, None, None, None]
        return y.reshape(y.shape[0], self.features, 2 * y.shape[2], 2 * y.shape[4])
