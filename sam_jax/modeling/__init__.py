"""Flax modules of SAM, one file per component."""

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PAD_LABEL, PromptEncoder
from .sam import Sam, decoder_params
from .transformer import TwoWayTransformer, image_context

__all__ = [
    "ImageEncoderViT",
    "MaskDecoder",
    "PAD_LABEL",
    "PromptEncoder",
    "Sam",
    "TwoWayTransformer",
    "decoder_params",
    "image_context",
]
