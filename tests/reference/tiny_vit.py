"""MobileSAM's TinyViT (PyPI mobilesam-mirror, module `mobile_sam`) as the reference image encoder of
`tests.reference.official_sam` for a "tiny_vit" config.

`mobile_sam` imports four names from timm, which does not load here: `tests/__init__.py` puts the
stand-in (timm_standin/, see its README) first on sys.path.
"""

from __future__ import annotations

from typing import Sequence

import torch

from tests import TIMM_STANDIN  # noqa: F401  (the timm stand-in, already first on sys.path)


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
