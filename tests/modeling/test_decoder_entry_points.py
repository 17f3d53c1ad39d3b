"""`Sam.decode_tokens` then `Sam.decode_masks` (the automatic mask generator's path: every prompt's
IoU, the masks of some) equal `Sam.decode`, in both output-upscaling layouts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax.modeling import Sam, image_context

# tiny (C = 48) upscales channels-first; C = 80 (> modeling.mask_decoder.CHANNELS_FIRST_MAX_DIM)
# takes the blocked layout the full-size models use.
CONFIGS = {
    "tiny": sam_jax.get_config("tiny"),
    "tiny-blocked": dataclasses.replace(sam_jax.get_config("tiny"), prompt_embed_dim=80),
}


# The blocked layout doubles the cases (~17 CPU-s): the daily tier keeps tiny's own.
@pytest.fixture(scope="module", params=[c if c == "tiny" else pytest.param(c, marks=pytest.mark.full) for c in CONFIGS])
def model_params(request):
    model = sam_jax.build_sam(CONFIGS[request.param])
    # Random values in every tensor the decoding reads (default init would leave biases at 0 and
    # norm scales at 1, where a skipped bias or norm goes unseen); the image encoder is not needed.
    shapes = sam_jax.param_shapes(model)
    rng = np.random.default_rng(0)
    params = {
        k: jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes[k])
        for k in ("prompt_encoder", "mask_decoder")
    }
    return model, params


def _prompts(cfg, rng, b):
    s, m = cfg.image_size, cfg.mask_input_size
    return dict(
        point_coords=jnp.asarray(rng.uniform(0, s, (b, 3, 2)), jnp.float32),
        point_labels=jnp.asarray(rng.integers(0, 2, (b, 3)), jnp.int32),
        boxes=jnp.asarray(np.sort(rng.uniform(0, s, (b, 2, 2)), axis=1).reshape(b, 4), jnp.float32),
        mask_inputs=jnp.asarray(rng.standard_normal((b, m, m)), jnp.float32),
    )


CASES = {  # prompt kinds, multimask_output, shared embedding (batch 1), image_context
    "points/multimask/shared": (("point_coords", "point_labels"), True, True, False),
    "points/multimask/context": (("point_coords", "point_labels"), True, True, True),
    "box+mask/single/per-prompt": (("boxes", "mask_inputs"), False, False, False),
    "all/single/shared": (("point_coords", "point_labels", "boxes", "mask_inputs"), False, True, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_tokens_then_masks_equals_decode(model_params, case):
    model, params = model_params
    kinds, multimask, shared, with_context = CASES[case]
    cfg = model.config
    rng = np.random.default_rng(3)
    b, e, c = 5, cfg.embedding_size, cfg.prompt_embed_dim
    emb = jnp.asarray(rng.standard_normal((1 if shared else b, e, e, c)), jnp.float32)
    prompts = {k: v for k, v in _prompts(cfg, rng, b).items() if k in kinds}
    extra = {}
    if with_context:
        pe = model.apply({"params": params}, method=Sam.get_dense_pe)
        extra = dict(image_pe=pe, image_context=image_context(params, emb, pe, cfg.decoder_num_heads))

    def apply(method, *args, **kw):
        return model.apply({"params": params}, *args, **kw, method=method)

    low, iou = apply(Sam.decode, emb, **prompts, **extra, multimask_output=multimask)
    iou2, hyper, tokens = apply(Sam.decode_tokens, emb, **prompts, **extra, multimask_output=multimask)
    m = 3 if multimask else 1
    assert low.shape == (b, m, 4 * e, 4 * e) and iou.shape == iou2.shape == (b, m)
    assert hyper.shape == (b, m, c // 8) and tokens.shape == (b, e, e, c)
    assert low.dtype == iou2.dtype == jnp.float32
    # Run op by op (no jit), the split path executes exactly Sam.decode's operations: bitwise
    # equal today. The margin (1e-6 of the logits' spread, far below any real error) only admits a
    # matmul that XLA blocks differently for another row count (the subset below).
    tol = 1e-6 * float(jnp.std(low))
    np.testing.assert_allclose(np.asarray(iou2), np.asarray(iou), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(apply(Sam.decode_masks, tokens, hyper)), np.asarray(low), rtol=0, atol=tol)
    # Any rows, in any order (AMG upscales only the prompts whose IoU passes its threshold).
    idx = jnp.asarray([4, 1, 3])
    part = apply(Sam.decode_masks, tokens[idx], hyper[idx])
    np.testing.assert_allclose(np.asarray(part), np.asarray(low)[np.asarray(idx)], rtol=0, atol=tol)
