"""SAM-HQ (PyPI segment-anything-hq, module `segment_anything_hq`) as the reference: its mask decoder
(`MaskDecoderHQ`), its ViT encoder (which also returns the intermediate embeddings) and its prompt
encoder, built for any SamConfig with every floating tensor randomised (`tests.reference.randomise_`),
and a strict state_dict -> `sam_jax` Flax params mapping for them.

`segment_anything_hq` imports its TinyViT, which imports timm, which imports torchvision: importing
`tests.reference.tiny_vit` first puts the timm stand-in on sys.path.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np
import torch

import tests.reference.tiny_vit  # noqa: F401  (the timm stand-in, first on sys.path)
from sam_jax.checkpoints.official import CONV_TO_FLAX, CONV_TRANSPOSE_TO_FLAX, LINEAR_TO_FLAX, flax_module_path
from sam_jax.config import SamConfig
from tests.reference import mask_decoder, prompt_encoder, randomise_, vit_encoder

# The decoder's torch ConvTranspose2d modules (paths inside the mask decoder): their weights are
# stored spatially flipped for Flax (see sam_jax.checkpoints.official.CONV_TRANSPOSE_TO_FLAX).
# SAM's own two, then SAM-HQ's four.
HQ_DECODER_CONV_TRANSPOSE = frozenset(
    {
        "output_upscaling.0",
        "output_upscaling.3",
        "compress_vit_feat.0",
        "compress_vit_feat.3",
        "embedding_encoder.0",
        "embedding_encoder.3",
    }
)

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def official_hq_decoder(cfg: SamConfig, vit_dim: int, seed: int = 0) -> torch.nn.Module:
    """`MaskDecoderHQ` as `segment_anything_hq.build_sam` assembles it, for cfg's decoder widths
    and a ViT of width vit_dim; every floating tensor randomised; eval mode."""
    from segment_anything_hq.modeling import MaskDecoderHQ, TwoWayTransformer

    return randomise_(mask_decoder(MaskDecoderHQ, TwoWayTransformer, cfg, vit_dim=vit_dim), seed).eval()


def official_hq_encoder(cfg: SamConfig, seed: int = 0) -> torch.nn.Module:
    """SAM-HQ's `ImageEncoderViT` for cfg (its forward returns (embeddings NCHW, [the NHWC token
    grid after each global-attention block])); every floating tensor randomised; eval mode."""
    from segment_anything_hq.modeling import ImageEncoderViT

    encoder = vit_encoder(ImageEncoderViT, cfg)
    # Under the name it has in a SAM model: randomise_ reads module paths (`pos_embed` alone has none).
    randomise_(torch.nn.ModuleDict({"image_encoder": encoder}), seed)
    return encoder.eval()


def official_prompt_encoder(cfg: SamConfig, seed: int = 0) -> torch.nn.Module:
    """SAM-HQ's `PromptEncoder` (SAM's) for cfg, randomised: makes realistic prompt tokens."""
    from segment_anything_hq.modeling import PromptEncoder

    return randomise_(prompt_encoder(PromptEncoder, cfg), seed).eval()


def flax_params(
    state_dict: Mapping[str, Any], expected: Mapping[str, Any], conv_transpose: frozenset = frozenset()
) -> Dict[str, Any]:
    """A reference module's state_dict -> the Flax params of the matching `sam_jax` module, by
    the converter's rules (module path by `flax_module_path`; "weight" -> whichever of kernel /
    scale / embedding the Flax module has; Linear / Conv2d layouts; ConvTranspose2d weights of
    the modules in `conv_transpose` flipped). `expected`: the Flax tree's shapes
    (`jax.eval_shape(model.init, ...)`). Strict: every key consumed, every param filled, every
    shape equal; all problems raised together."""
    from flax import traverse_util

    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(expected).items()}
    out: Dict[str, np.ndarray] = {}
    seen = set()
    errors = []
    for key, t in state_dict.items():
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        x = t.detach().cpu().numpy()
        prefix = flax_module_path(module) if module else ""
        if leaf == "weight":
            found = [w for w in _WEIGHT_LEAVES if f"{prefix}/{w}".lstrip("/") in want]
            leaf = found[0] if len(found) == 1 else "weight"
            if leaf == "kernel" and x.ndim == 2:
                x = x.transpose(LINEAR_TO_FLAX)
            elif leaf == "kernel" and module in conv_transpose:
                x = x.transpose(CONV_TRANSPOSE_TO_FLAX)[::-1, ::-1]
            elif leaf == "kernel":
                x = x.transpose(CONV_TO_FLAX)
        path = f"{prefix}/{leaf}".lstrip("/")
        if path in seen:
            errors.append(f"{key}: {path} filled twice")
        seen.add(path)
        if path not in want:
            errors.append(f"{key}: no parameter {path}")
        elif x.shape != want[path]:
            errors.append(f"{key}: shape {x.shape} (as {path}), expected {want[path]}")
        else:
            out[path] = np.ascontiguousarray(x, np.float32)
    errors += [f"{p}: not filled" for p in want if p not in seen]
    if errors:
        raise ValueError("state_dict does not match the Flax tree:\n  " + "\n  ".join(errors))
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in out.items()})
