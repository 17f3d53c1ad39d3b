"""MobileSAM's TinyViT (PyPI mobilesam-mirror, module `mobile_sam`) as the reference: built for any
config, every floating tensor randomised, and its state_dict mapped onto `sam_jax`'s Flax tree.

`mobile_sam` imports four names from timm, and timm imports torchvision, which does not load
here: the stand-in in timm_standin/ (see its README) goes first on sys.path when this module is
imported, before anything imports `mobile_sam`.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Dict, Mapping, Sequence

import numpy as np
import torch

from sam_jax.checkpoints.official import CONV_TO_FLAX, LINEAR_TO_FLAX, flax_module_path

TIMM_STANDIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "timm_standin")
if TIMM_STANDIN not in sys.path:
    sys.path.insert(0, TIMM_STANDIN)

# MobileSAM's `build_sam_vit_t` encoder (sam_jax.modeling.tiny_vit.TinyViT's defaults).
VIT_T = dict(
    img_size=1024,
    embed_dims=(64, 128, 160, 320),
    depths=(2, 2, 6, 2),
    num_heads=(2, 4, 5, 10),
    window_sizes=(7, 7, 14, 7),
    mlp_ratio=4.0,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
)

# Keys of the reference state_dict with no Flax parameter: the classifier the forward never calls
# (norm_head, head) and BatchNorm's training counter. Nothing else may be left over.
UNUSED_PREFIXES = ("norm_head.", "head.")
UNUSED_LEAVES = ("num_batches_tracked",)


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


@torch.no_grad()
def randomise_tiny_vit_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Refills EVERY floating tensor of the state_dict in place: BatchNorm statistics included
    (running_mean random, running_var positive), attention biases large enough to change every
    attention map. Then `.eval()` again: the reference caches the gathered attention bias (`ab`)
    when put in eval mode, and would keep the old one."""
    g = torch.Generator().manual_seed(seed)
    bns = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    for key, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        module, leaf = key.rsplit(".", 1)
        if leaf == "attention_biases":
            new = randn(t.shape, 1.0)
        elif leaf == "running_mean":
            new = randn(t.shape, 0.2)
        elif leaf == "running_var":
            new = 0.5 + torch.rand(t.shape, generator=g)  # in [0.5, 1.5)
        elif leaf == "weight" and t.ndim == 1:  # LayerNorm, LayerNorm2d, BatchNorm
            new = 1.0 + randn(t.shape, 0.2)
        elif leaf == "bias":
            new = randn(t.shape, 0.1)
        elif leaf == "weight":
            new = randn(t.shape, t[0].numel() ** -0.5)
        else:
            raise AssertionError(f"no randomisation rule for {key}")
        assert module in bns or leaf not in ("running_mean", "running_var"), key
        t.copy_(new)
    return model.eval()


def tiny_vit_params(state_dict: Mapping[str, Any], expected: Mapping[str, Any]) -> Dict[str, Any]:
    """The reference TinyViT's state_dict (keys without the `image_encoder.` prefix) -> the Flax
    params of `sam_jax.modeling.tiny_vit.TinyViT`, by the mechanical rule in that module's
    docstring. `expected`: the Flax param tree's shapes (`jax.eval_shape(model.init, ...)`), to
    check against: every key consumed (but UNUSED_*), every param filled, every shape equal; all
    problems raised together.

    For now a test helper: the converter integration (the next step of issue 28) moves this into
    sam_jax/checkpoints, with layout detection from the keys and the round trip back to `.pth`.
    """
    from flax import traverse_util

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    out: Dict[str, np.ndarray] = {}
    seen = set()
    errors = []
    for key, t in state_dict.items():
        if key.startswith(UNUSED_PREFIXES) or key.rsplit(".", 1)[1] in UNUSED_LEAVES:
            continue
        module, leaf = key.rsplit(".", 1)
        x = t.detach().cpu().numpy()
        if leaf == "weight":
            leaf = "scale" if x.ndim == 1 else "kernel"
            x = x.transpose(LINEAR_TO_FLAX if x.ndim == 2 else CONV_TO_FLAX) if x.ndim > 1 else x
        path = f"{flax_module_path(module)}/{leaf}"
        seen.add(path)
        if path not in want:
            errors.append(f"{key}: no parameter {path}")
        elif x.shape != want[path]:
            errors.append(f"{key}: shape {x.shape} (as {path}), expected {want[path]}")
        else:
            out[path] = np.ascontiguousarray(x, np.float32)
    errors += [f"{p}: not filled" for p in want if p not in seen]
    if errors:
        raise ValueError("state_dict does not match TinyViT:\n  " + "\n  ".join(errors))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
