"""`Sam`: the image encoder, prompt encoder and mask decoder behind two entry points.

Layouts at this boundary:
  * images: (B, S, S, 3) NHWC float32, already normalised and zero-padded (see `preprocess`);
  * image embeddings: (B, h, w, C) NHWC, h = w = S / 16;
  * coordinates: pixels of the padded S x S model input (the 1024 frame), x then y;
  * mask logits: (B, M, 4h, 4w), masks first (M masks per prompt), as the official code.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ..config import SamConfig
from .common import Dtype
from .image_encoder import ImageEncoderViT, check_attention_impl
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT

# The top-level parameter subtrees that decoding reads (`Sam.get_dense_pe`, `decode`,
# `decode_tokens`, `decode_masks` and `image_context`).
DECODER_PARTS = ("prompt_encoder", "mask_decoder")


def decoder_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """The part of a full SAM parameter tree that decoding reads: a jitted decode given only this
    does not flatten the image encoder's parameters on every call. ValueError when a part is
    missing (not a SAM parameter tree)."""
    missing = [k for k in DECODER_PARTS if k not in params]
    if missing:
        raise ValueError(f"params has no {' or '.join(missing)} subtree: expected a full SAM parameter tree")
    return {k: params[k] for k in DECODER_PARTS}


class Sam(nn.Module):
    """Segment Anything. Build it with `sam_jax.build_sam`; call methods through `apply`.
    `dtype=jnp.bfloat16` (or `model.clone(dtype=...)` of a loaded model) computes the products in
    bf16 with float32 accumulation, the rest in float32 (`modeling.common`); outputs are float32.

    >>> emb = model.apply({"params": params}, images, method="encode_image")
    >>> logits, iou = model.apply({"params": params}, emb, coords, labels, method="decode")

    Name the method (a string, or the bound `model.encode_image`): a quantized model
    (`sam_jax.quantize`) intercepts its methods by name, and the unbound `Sam.encode_image` of the
    float class would bypass that.

    `decode` is `decode_tokens` (every prompt's IoU) then `decode_masks` (logits for any subset).
    """

    config: SamConfig
    dtype: Dtype = None
    remat_encoder: bool = False
    attention_impl: str = "chunked"

    def setup(self) -> None:
        cfg = self.config
        check_attention_impl(self.attention_impl)
        if cfg.encoder_type == "tiny_vit":
            self.image_encoder = TinyViT(
                img_size=cfg.image_size,
                embed_dims=cfg.tiny_vit_embed_dims,
                depths=cfg.tiny_vit_depths,
                num_heads=cfg.tiny_vit_num_heads,
                window_sizes=cfg.tiny_vit_window_sizes,
                mlp_ratio=cfg.mlp_ratio,
                out_chans=cfg.prompt_embed_dim,
                dtype=self.dtype,
            )
        else:
            self.image_encoder = ImageEncoderViT(
                embed_dim=cfg.encoder_embed_dim,
                depth=cfg.encoder_depth,
                num_heads=cfg.encoder_num_heads,
                global_attn_indexes=cfg.encoder_global_attn_indexes,
                img_size=cfg.image_size,
                patch_size=cfg.patch_size,
                window_size=cfg.window_size,
                mlp_ratio=cfg.mlp_ratio,
                out_chans=cfg.prompt_embed_dim,
                dtype=self.dtype,
                remat_blocks=self.remat_encoder,
                attention_impl=self.attention_impl,
            )
        self.prompt_encoder = PromptEncoder(
            embed_dim=cfg.prompt_embed_dim,
            image_embedding_size=cfg.embedding_size,
            input_image_size=cfg.image_size,
            mask_in_chans=cfg.mask_in_chans,
            dtype=self.dtype,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=cfg.prompt_embed_dim,
            transformer_depth=cfg.decoder_depth,
            transformer_num_heads=cfg.decoder_num_heads,
            transformer_mlp_dim=cfg.decoder_mlp_dim,
            num_multimask_outputs=cfg.num_multimask_outputs,
            iou_head_depth=cfg.iou_head_depth,
            iou_head_hidden_dim=cfg.iou_head_hidden_dim,
            dtype=self.dtype,
            hq=cfg.hq,
            vit_dim=cfg.encoder_embed_dim if cfg.hq else 0,
        )

    def encode_image(self, images: jax.Array) -> jax.Array:
        """(B, S, S, 3) preprocessed NHWC images -> (B, h, w, C) NHWC embeddings (float32)."""
        return self.image_encoder(images).astype(jnp.float32)

    def encode_image_hq(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """SAM-HQ (config.hq): (B, S, S, 3) preprocessed NHWC images -> the embeddings (B, h, w, C)
        and the per-image HQ features (B, 4h, 4w, C/8) that `decode` / `decode_masks` take as
        `hq_features` (from the ViT's tokens after its first global block), both float32."""
        if not self.config.hq:
            raise ValueError("encode_image_hq is SAM-HQ's (config.hq); use encode_image")
        emb, interm = self.image_encoder(images, interm=True)
        hq_features = self.mask_decoder.hq_features(emb, interm)
        return emb.astype(jnp.float32), hq_features.astype(jnp.float32)

    def encode_image_interm(self, images: jax.Array) -> Tuple[jax.Array, jax.Array]:
        """SAM-HQ (config.hq): (B, S, S, 3) preprocessed NHWC images -> the embeddings (B, h, w, C)
        and the ViT's tokens after its first global block (B, h, w, encoder width), both float32:
        what `hq_features` takes (fine-tuning caches these, as the HQ features come from
        trainable layers)."""
        if not self.config.hq:
            raise ValueError("encode_image_interm is SAM-HQ's (config.hq); use encode_image")
        emb, interm = self.image_encoder(images, interm=True)
        return emb.astype(jnp.float32), interm.astype(jnp.float32)

    def hq_features(self, embeddings: jax.Array, interm_embeddings: jax.Array) -> jax.Array:
        """SAM-HQ (config.hq): the HQ features (B, 4h, 4w, C/8) that `decode` / `decode_masks`
        take, from `encode_image_interm`'s two outputs; float32."""
        if not self.config.hq:
            raise ValueError("hq_features is SAM-HQ's (config.hq)")
        return self.mask_decoder.hq_features(embeddings, interm_embeddings).astype(jnp.float32)

    def encode_image_layers(self, x: jax.Array, start: int, stop: int) -> jax.Array:
        """One stage of `encode_image`: the image encoder's half-blocks start..stop-1 (static; 2i
        is block i's attention half, 2i + 1 its MLP half; see `ImageEncoderViT.__call__`). x is the
        preprocessed images when start == 0, else the token grid the previous stage returned; the
        last stage (stop == 2 * depth) returns the float32 embeddings. SAM's ViT only (see
        `backend.encoder_stages`)."""
        if self.config.encoder_type != "vit":
            raise ValueError(f"encode_image_layers stages SAM's ViT; this encoder is {self.config.encoder_type!r}")
        out = self.image_encoder(x, layers=(start, stop))
        return out.astype(jnp.float32) if stop == 2 * self.config.encoder_depth else out

    def encode_prompts(self, point_coords=None, point_labels=None, boxes=None, mask_inputs=None):
        """See `PromptEncoder.__call__`: returns (sparse (B,T,C), dense (B,h,w,C), token_valid (B,T))."""
        return self.prompt_encoder(point_coords, point_labels, boxes, mask_inputs)

    def get_dense_pe(self) -> jax.Array:
        """Positional encoding of the embedding grid, (h, w, C)."""
        return self.prompt_encoder.get_dense_pe()

    def decode(
        self,
        image_embeddings: jax.Array,
        point_coords: Optional[jax.Array] = None,
        point_labels: Optional[jax.Array] = None,
        boxes: Optional[jax.Array] = None,
        mask_inputs: Optional[jax.Array] = None,
        multimask_output: bool = True,
        image_context: Optional[Dict[str, jax.Array]] = None,
        image_pe: Optional[jax.Array] = None,
        hq_features: Optional[jax.Array] = None,
        hq_token_only: bool = False,
    ) -> Tuple[jax.Array, jax.Array]:
        """Decodes a batch of B prompts against image embeddings: `decode_tokens` then
        `decode_masks`.

        Args:
          image_embeddings: (1, h, w, C) shared by every prompt, or (B, h, w, C) one per prompt.
          point_coords: (B, N, 2) pixels in the model-input frame; point_labels: (B, N) int.
          boxes: (B, 4) as (x0, y0, x1, y1) in the model-input frame.
          mask_inputs: (B, 4h, 4w) mask logits.
          multimask_output: static; True returns 3 masks per prompt, False one.
          image_context: optional `modeling.image_context(params, image_embeddings, pe)` of a
            (1, h, w, C) embedding: layer 0's image side precomputed (prompts without mask_inputs).
          image_pe: optional `get_dense_pe()` computed beforehand (it is the same for every call).
          hq_features: SAM-HQ only, required: `encode_image_hq`'s HQ features of the image, (1,
            4h, 4w, C/8) shared or (B, ...) one per prompt, like image_embeddings.
          hq_token_only: SAM-HQ only, static: the HQ mask alone instead of SAM's + HQ's.

        Returns:
          low-res mask logits (B, M, 4h, 4w) and IoU predictions (B, M), float32; SAM-HQ returns
          one mask per prompt (M = 1: with multimask_output, SAM's part is its best of three).
        """
        iou, hyper, image_tokens = self.decode_tokens(
            image_embeddings, point_coords, point_labels, boxes, mask_inputs, multimask_output, image_context, image_pe
        )
        return self.decode_masks(image_tokens, hyper, hq_features, hq_token_only), iou

    def decode_tokens(
        self,
        image_embeddings: jax.Array,
        point_coords: Optional[jax.Array] = None,
        point_labels: Optional[jax.Array] = None,
        boxes: Optional[jax.Array] = None,
        mask_inputs: Optional[jax.Array] = None,
        multimask_output: bool = True,
        image_context: Optional[Dict[str, jax.Array]] = None,
        image_pe: Optional[jax.Array] = None,
    ) -> Tuple[jax.Array, jax.Array, jax.Array]:
        """`decode` up to the output upscaling (same arguments): for callers that need every
        prompt's IoU but the masks of only some (the automatic mask generator).

        Returns IoU predictions (B, M) float32, hypernetwork outputs (B, M, C/8) and image tokens
        (B, h, w, C) NHWC, the last two float32 for float32 params or a 16-bit `dtype` (see
        `modeling.common`): `decode_masks` of any rows of them equals those rows of `decode`'s
        logits.
        """
        if image_context is not None and mask_inputs is not None:
            raise ValueError(
                "image_context holds the image side for prompts WITHOUT a mask input; "
                "pass image_context=None with mask_inputs"
            )
        sparse, dense, valid = self.prompt_encoder(point_coords, point_labels, boxes, mask_inputs)
        pe = self.prompt_encoder.get_dense_pe() if image_pe is None else image_pe
        iou, hyper, image_tokens = self.mask_decoder.predict_tokens(
            image_embeddings, pe, sparse, dense, multimask_output, token_valid=valid, image_context=image_context
        )
        return iou.astype(jnp.float32), hyper, image_tokens

    def decode_masks(
        self,
        image_tokens: jax.Array,
        hyper: jax.Array,
        hq_features: Optional[jax.Array] = None,
        hq_token_only: bool = False,
    ) -> jax.Array:
        """Image tokens (K, h, w, C) and hypernetwork outputs (K, M, C/8) from `decode_tokens`
        (the same K rows of both) -> low-res mask logits (K, M, 4h, 4w), float32. SAM-HQ: also
        hq_features (1 or K rows) and hq_token_only, as `decode`."""
        if not self.config.hq:  # SAM's call, exactly as before SAM-HQ (the decoder checks the rest)
            if hq_features is not None or hq_token_only:
                raise ValueError("hq_features and hq_token_only are SAM-HQ's (config.hq); this model is SAM")
            return self.mask_decoder.upscale(image_tokens, hyper).astype(jnp.float32)
        return self.mask_decoder.upscale(image_tokens, hyper, hq_features, hq_token_only).astype(jnp.float32)

    def __call__(
        self, images, point_coords=None, point_labels=None, boxes=None, mask_inputs=None, multimask_output: bool = True
    ):
        """encode_image (SAM-HQ: encode_image_hq) then decode."""
        emb, hq_features = self._encode_for_decode(images)
        return self.decode(
            emb, point_coords, point_labels, boxes, mask_inputs, multimask_output, hq_features=hq_features
        )

    def _encode_for_decode(self, images: jax.Array) -> Tuple[jax.Array, Optional[jax.Array]]:
        """(embeddings, HQ features or None): what `decode` needs of the images, for either model."""
        return self.encode_image_hq(images) if self.config.hq else (self.encode_image(images), None)

    def init_all(self, images, point_coords, point_labels, boxes, mask_inputs):
        """Touches every parameter (a mask prompt, and no mask prompt): `init` goes through here."""
        emb, hq_features = self._encode_for_decode(images)
        self.decode(emb, point_coords, point_labels, boxes, mask_inputs, hq_features=hq_features)
        return self.decode(emb, hq_features=hq_features)
