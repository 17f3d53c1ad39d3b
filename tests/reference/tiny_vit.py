"""MobileSAM's TinyViT (PyPI mobilesam-mirror, module `mobile_sam`) as the reference image encoder of
`tests.reference.official_sam` for a "tiny_vit" config.

`mobile_sam` imports four names from timm, and timm imports torchvision, which does not load
here: the stand-in in timm_standin/ (see its README) goes first on sys.path when this module is
imported, before anything imports `mobile_sam`.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import torch


TIMM_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_standin")
if TIMM_STANDIN not in sys.path:
    sys.path.insert(0, TIMM_STANDIN)


def official_tiny_vit(
    img_size: int,
    embed_dims: Sequence[int],
    depths: Sequence[int],
    num_heads: Sequence[int],
    window_sizes: Sequence[int],
    mlp_ratio: float = 4.0,
    mbconv_expand_ratio: float = 4.0,
    local_conv_size: int = 3,
) -> torch.nn.Module:
    """The reference TinyViT as `build_sam_vit_t` builds it (no dropout, no drop path), eval mode."""
    from mobile_sam.modeling import TinyViT

    model = TinyViT(
        img_size=img_size,
        in_chans=3,
        num_classes=1000,
        embed_dims=list(embed_dims),
        depths=list(depths),
        num_heads=list(num_heads),
        window_sizes=list(window_sizes),
        mlp_ratio=mlp_ratio,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=mbconv_expand_ratio,
        local_conv_size=local_conv_size,
        layer_lr_decay=0.8,
    )
    return model.eval()
