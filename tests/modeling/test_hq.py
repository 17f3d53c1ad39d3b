"""SAM-HQ in `sam_jax.modeling`: `MaskDecoder(hq=True)` and `ImageEncoderViT(..., interm=True)` against
the reference `segment_anything_hq` (every floating tensor randomised), its two halves
(`predict_tokens` then `upscale` of any rows), and SAM's decoder left as it was with hq=False."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import sam_jax
from sam_jax import backend
from sam_jax.modeling import image_context
from sam_jax.modeling.image_encoder import ImageEncoderViT
from sam_jax.modeling.mask_decoder import MaskDecoder
from tests.reference import mask_decoder, max_rel_err, randomise_, to_nchw, to_nhwc
from tests.reference.hq import (
    HQ_DECODER_CONV_TRANSPOSE,
    flax_params,
    official_hq_decoder,
    official_hq_encoder,
    official_prompt_encoder,
)

TINY = sam_jax.get_config("tiny")
# (config, ViT width of the intermediate embedding). tiny (C = 48) upscales channels-first; C = 80
# (> modeling.mask_decoder.CHANNELS_FIRST_MAX_DIM) takes the blocked layout of the full-size
# models; vit_b's widths are SAM-HQ's vit_b decoder. The ViT widths differ from C on purpose.
CONFIGS = {
    "tiny": (TINY, 40),
    "tiny-blocked": (dataclasses.replace(TINY, prompt_embed_dim=80), 56),
    "vit_b": (sam_jax.get_config("vit_b"), 768),
}
HQ_MODULES = {
    "hf_token",
    "hf_mlp",
    *(f"{m}_{i}" for m in ("compress_vit_feat", "embedding_encoder", "embedding_maskfeature") for i in (0, 1, 3)),
}
N_PROMPTS = 4


def _decoder(cfg, hq: bool, vit_dim: int = 0) -> MaskDecoder:
    return MaskDecoder(
        transformer_dim=cfg.prompt_embed_dim,
        transformer_depth=cfg.decoder_depth,
        transformer_num_heads=cfg.decoder_num_heads,
        transformer_mlp_dim=cfg.decoder_mlp_dim,
        num_multimask_outputs=cfg.num_multimask_outputs,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        hq=hq,
        vit_dim=vit_dim,
    )


def _shapes(decoder: MaskDecoder, cfg, vit_dim: int = 0):
    c, e = cfg.prompt_embed_dim, cfg.embedding_size
    args = (
        jax.ShapeDtypeStruct((1, e, e, c), jnp.float32),
        jax.ShapeDtypeStruct((e, e, c), jnp.float32),
        jax.ShapeDtypeStruct((2, 5, c), jnp.float32),
        jax.ShapeDtypeStruct((2, e, e, c), jnp.float32),
    )
    interm = jax.ShapeDtypeStruct((1, e, e, vit_dim), jnp.float32) if decoder.hq else None

    def init(*a, **kw):
        return decoder.init(jax.random.key(0), *a, False, **kw)

    return jax.eval_shape(init, *args, **({"interm_embeddings": interm} if decoder.hq else {}))["params"]


class Case:
    """A randomised reference MaskDecoderHQ, our decoder with its converted params, and inputs: one
    image embedding (and intermediate embedding) shared by N_PROMPTS prompts of 3 points, a box
    and a mask input each (the reference prompt encoder makes their tokens)."""

    def __init__(self, name: str):
        cfg, vit_dim = CONFIGS[name]
        self.cfg, self.vit_dim = cfg, vit_dim
        self.ref = official_hq_decoder(cfg, vit_dim, seed=1)
        self.prompts = prompts = official_prompt_encoder(cfg, seed=2)
        self.decoder = _decoder(cfg, True, vit_dim)

        rng = np.random.default_rng(0)
        b, c, e, s = N_PROMPTS, cfg.prompt_embed_dim, cfg.embedding_size, cfg.image_size
        self.emb = rng.standard_normal((1, e, e, c)).astype(np.float32)
        self.interm = rng.standard_normal((1, e, e, vit_dim)).astype(np.float32)
        with torch.no_grad():
            self.sparse, self.dense = prompts(
                points=(torch.tensor(rng.uniform(0, s, (b, 3, 2)), dtype=torch.float32), torch.tensor([[1, 0, 1]] * b)),
                boxes=torch.tensor(np.sort(rng.uniform(0, s, (b, 2, 2)), axis=1).reshape(b, 4), dtype=torch.float32),
                masks=torch.tensor(rng.standard_normal((b, 1, 4 * e, 4 * e)), dtype=torch.float32),
            )
            self.image_pe = prompts.get_dense_pe()
        self.args = (
            jnp.asarray(self.emb),
            jnp.asarray(to_nhwc(self.image_pe)[0]),
            jnp.asarray(self.sparse.numpy()),
            jnp.asarray(to_nhwc(self.dense)),
        )
        self._spread_multimask_choice()
        self.params = flax_params(self.ref.state_dict(), _shapes(self.decoder, cfg, vit_dim), HQ_DECODER_CONV_TRANSPOSE)

    @torch.no_grad()
    def _spread_multimask_choice(self) -> None:
        """With random weights the IoU head's per-output offsets dominate: every prompt picks the
        same multimask output, and a selection that ignores the row would pass. Shift the three
        multimask biases so that their mean over these prompts is equal: the choice then follows
        each prompt (see test_multimask_choice_is_exercised)."""
        mean = torch.from_numpy(self.reference_all_ious()[:, 1:].mean(0))
        self.ref.iou_prediction_head.layers[-1].bias[1:] -= mean - mean.mean()

    @torch.no_grad()
    def reference(self, multimask: bool, hq_token_only: bool):
        masks, iou = self.ref(
            to_nchw(self.emb),
            self.image_pe,
            self.sparse,
            self.dense,
            multimask,
            hq_token_only,
            [torch.from_numpy(self.interm)],
        )
        return masks.numpy(), iou.numpy()

    @torch.no_grad()
    def reference_all_ious(self) -> np.ndarray:
        """The reference's IoU predictions of all 4 SAM masks, (B, 4)."""
        hq = self.ref.embedding_encoder(to_nchw(self.emb)) + self.ref.compress_vit_feat(to_nchw(self.interm))
        return self.ref.predict_masks(to_nchw(self.emb), self.image_pe, self.sparse, self.dense, hq)[1].numpy()

    def apply(self, *args, method=None, **kw):
        return self.decoder.apply({"params": self.params}, *args, method=method, **kw)


# The daily tier keeps tiny's cases (~20 CPU-s); the blocked layout adds ~15 CPU-s, vit_b's widths
# ~35 (the reference alone ~2.7 s per combination).
@pytest.fixture(scope="module", params=[n if n == "tiny" else pytest.param(n, marks=pytest.mark.full) for n in CONFIGS])
def case(request) -> Case:
    return Case(request.param)


@pytest.mark.parametrize("hq_token_only", [False, True], ids=["sam+hq", "hq_only"])
@pytest.mark.parametrize("multimask", [False, True], ids=["single", "multimask"])
def test_decoder_matches_reference(case, multimask, hq_token_only):
    ref_masks, ref_iou = case.reference(multimask, hq_token_only)
    masks, iou = case.apply(
        *case.args, multimask, interm_embeddings=jnp.asarray(case.interm), hq_token_only=hq_token_only
    )
    e = case.cfg.embedding_size
    assert masks.shape == ref_masks.shape == (N_PROMPTS, 1, 4 * e, 4 * e)
    assert iou.shape == ref_iou.shape == (N_PROMPTS, 1)
    # float32 on both sides, matmuls at "highest": reached 2.4e-6 (tiny, tiny-blocked) and 4.7e-6
    # (vit_b widths) of the logits' spread, IoU within 8e-7; 2e-5 leaves rounding room and still
    # catches any wrong tap, norm or selection.
    assert max_rel_err(masks, ref_masks) < 2e-5
    np.testing.assert_allclose(np.asarray(iou), ref_iou, rtol=0, atol=1e-5)


def test_image_context_path(case):
    """Prompts without a mask input through `image_context` (the predictor's path: layer 0's image
    side computed once per image) match the reference too."""
    if case.cfg.prompt_embed_dim > 100:
        pytest.skip("the tiny configs cover both upscaling layouts")
    rng = np.random.default_rng(6)
    b, s = N_PROMPTS, case.cfg.image_size
    with torch.no_grad():
        pts = torch.tensor(rng.uniform(0, s, (b, 2, 2)), dtype=torch.float32)
        sparse, dense = case.prompts(points=(pts, torch.tensor([[1, 0]] * b)), boxes=None, masks=None)
        ref_masks, ref_iou = case.ref(
            to_nchw(case.emb), case.image_pe, sparse, dense, True, False, [torch.from_numpy(case.interm)]
        )
    emb, pe = case.args[:2]
    no_mask = jnp.asarray(case.prompts.no_mask_embed.weight.detach().numpy())
    full = {"prompt_encoder": {"no_mask_embed": {"embedding": no_mask}}, "mask_decoder": case.params}
    context = image_context(full, emb, pe, case.cfg.decoder_num_heads)
    masks, iou = case.apply(emb, pe, jnp.asarray(sparse.numpy()), None, True, None, context, jnp.asarray(case.interm))
    assert max_rel_err(masks, ref_masks.numpy()) < 2e-5  # as test_decoder_matches_reference
    np.testing.assert_allclose(np.asarray(iou), ref_iou.numpy(), rtol=0, atol=1e-5)


def test_multimask_choice_is_exercised(case):
    """The multimask cases above pick different masks for different prompts, each by a margin far
    above rounding: a wrong choice (another index, the HQ token's IoU) would fail them."""
    ious = case.reference_all_ious()[:, 1:]
    best = np.argmax(ious, axis=1)
    assert len(set(best.tolist())) > 1, best
    top2 = np.sort(ious, axis=1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 1e-4), top2


@pytest.mark.parametrize("hq_token_only", [False, True], ids=["sam+hq", "hq_only"])
def test_upscale_of_rows_equals_rows_of_the_call(case, hq_token_only):
    if case.cfg.prompt_embed_dim > 100:
        pytest.skip("the tiny configs cover both upscaling layouts")
    interm = jnp.asarray(case.interm)
    low, iou = case.apply(*case.args, True, interm_embeddings=interm, hq_token_only=hq_token_only)
    feats = case.apply(case.args[0], interm, method=MaskDecoder.hq_features)
    e, c = case.cfg.embedding_size, case.cfg.prompt_embed_dim
    assert feats.shape == (1, 4 * e, 4 * e, c // 8)
    iou2, hyper, tokens = case.apply(*case.args, True, method=MaskDecoder.predict_tokens)
    assert (
        iou2.shape == (N_PROMPTS, 1) and hyper.shape == (N_PROMPTS, 2, c // 8) and tokens.shape == (N_PROMPTS, e, e, c)
    )
    # Op by op, the split path runs __call__'s operations; the margin only admits a matmul that
    # XLA blocks differently for another row count.
    tol = 1e-6 * float(jnp.std(low))
    np.testing.assert_allclose(np.asarray(iou2), np.asarray(iou), rtol=0, atol=1e-6)
    full = case.apply(tokens, hyper, feats, hq_token_only, method=MaskDecoder.upscale)
    np.testing.assert_allclose(np.asarray(full), np.asarray(low), rtol=0, atol=tol)
    idx = jnp.asarray([3, 0, 2])
    part = case.apply(tokens[idx], hyper[idx], feats, hq_token_only, method=MaskDecoder.upscale)
    np.testing.assert_allclose(np.asarray(part), np.asarray(low)[np.asarray(idx)], rtol=0, atol=tol)
    # Per-row features (one image per prompt) give the same.
    rows = jnp.broadcast_to(feats, (3, *feats.shape[1:]))
    part = case.apply(tokens[idx], hyper[idx], rows, hq_token_only, method=MaskDecoder.upscale)
    np.testing.assert_allclose(np.asarray(part), np.asarray(low)[np.asarray(idx)], rtol=0, atol=tol)


def test_param_trees():
    """hq=False is SAM's decoder: exactly the official MaskDecoder's tensors (strict mapping).
    hq=True adds exactly SAM-HQ's modules (strict mapping in `Case`), the rest unchanged."""
    from segment_anything.modeling import MaskDecoder as OfficialMaskDecoder
    from segment_anything.modeling import TwoWayTransformer

    cfg, vit_dim = CONFIGS["tiny"]
    official = mask_decoder(OfficialMaskDecoder, TwoWayTransformer, cfg)
    sam = _shapes(_decoder(cfg, False), cfg)
    flax_params(randomise_(official, 0).state_dict(), sam, frozenset({"output_upscaling.0", "output_upscaling.3"}))
    hq = _shapes(_decoder(cfg, True, vit_dim), cfg, vit_dim)
    assert set(hq) - set(sam) == HQ_MODULES and set(sam) <= set(hq)

    def flat(tree):
        return {k: v.shape for k, v in traverse_util.flatten_dict(tree).items()}

    assert flat({k: hq[k] for k in sam}) == flat(sam)


def test_bad_input():
    cfg, vit_dim = CONFIGS["tiny"]
    c, e = cfg.prompt_embed_dim, cfg.embedding_size
    emb, pe = jnp.zeros((1, e, e, c)), jnp.zeros((e, e, c))
    sparse, dense = jnp.zeros((2, 5, c)), jnp.zeros((2, e, e, c))
    hq, sam = _decoder(cfg, True, vit_dim), _decoder(cfg, False)
    params = jax.tree.map(jnp.zeros_like, _shapes(hq, cfg, vit_dim))
    sam_params = {k: v for k, v in params.items() if k not in HQ_MODULES}
    with pytest.raises(ValueError, match="interm_embeddings"):
        hq.apply({"params": params}, emb, pe, sparse, dense, True)
    with pytest.raises(ValueError, match="interm_embeddings"):
        hq.apply({"params": params}, emb, pe, sparse, dense, True, interm_embeddings=jnp.zeros((1, e, e, c)))
    with pytest.raises(ValueError, match="interm_embeddings"):
        sam.apply({"params": sam_params}, emb, pe, sparse, dense, True, interm_embeddings=jnp.zeros((1, e, e, vit_dim)))
    with pytest.raises(ValueError, match="hq_token_only"):
        sam.apply({"params": sam_params}, emb, pe, sparse, dense, True, hq_token_only=True)
    hyper, tokens = jnp.zeros((2, 2, c // 8)), jnp.zeros((2, e, e, c))  # predict_tokens' shapes
    with pytest.raises(ValueError, match="hq_features"):
        hq.apply({"params": params}, tokens, hyper, method=MaskDecoder.upscale)
    with pytest.raises(ValueError, match="hq_features"):
        hq.apply({"params": params}, tokens, hyper, jnp.zeros((3, 4 * e, 4 * e, c // 8)), method=MaskDecoder.upscale)
    with pytest.raises(ValueError, match="hq_features"):
        sam.apply(
            {"params": sam_params},
            tokens,
            hyper[:, :1],
            jnp.zeros((1, 4 * e, 4 * e, c // 8)),
            method=MaskDecoder.upscale,
        )
    with pytest.raises(ValueError, match="vit_dim"):
        _shapes(_decoder(cfg, True, 0), cfg, 8)


# Two global blocks, so that taking the second one's output instead of the first's would show.
ENCODER_CFG = dataclasses.replace(TINY, encoder_global_attn_indexes=(1, 2))


def _encoder(cfg) -> ImageEncoderViT:
    return ImageEncoderViT(
        embed_dim=cfg.encoder_embed_dim,
        depth=cfg.encoder_depth,
        num_heads=cfg.encoder_num_heads,
        global_attn_indexes=cfg.encoder_global_attn_indexes,
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        window_size=cfg.window_size,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.prompt_embed_dim,
    )


def test_encoder_interm_matches_reference():
    cfg = ENCODER_CFG
    ref = official_hq_encoder(cfg, seed=4)
    enc = _encoder(cfg)
    x = np.random.default_rng(5).standard_normal((2, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    shapes = jax.eval_shape(enc.init, jax.random.key(0), jnp.asarray(x))["params"]
    params = flax_params(ref.state_dict(), shapes)
    assert jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.asarray(x), interm=True))["params"] == shapes
    with torch.no_grad():
        ref_emb, ref_interm = ref(to_nchw(x))
    assert len(ref_interm) == 2

    emb, interm = enc.apply({"params": params}, jnp.asarray(x), interm=True)
    e = cfg.embedding_size
    assert interm.shape == (2, e, e, cfg.encoder_embed_dim)
    # float32, "highest": reached 2.8e-6 (interm) and 4.0e-6 (embeddings) of the spread.
    assert max_rel_err(interm, ref_interm[0].numpy()) < 1e-5
    assert max_rel_err(interm, ref_interm[1].numpy()) > 0.1  # the first global block's, not the last
    assert max_rel_err(emb, to_nhwc(ref_emb)) < 1e-5
    np.testing.assert_array_equal(np.asarray(enc.apply({"params": params}, jnp.asarray(x))), np.asarray(emb))

    # The staged chain (backend.encoder_stages): the one stage that runs the first global block's
    # MLP half returns it, the others None.
    y, found = jnp.asarray(x), []
    for start, stop, _ in backend.encoder_stages(cfg):
        y, got = enc.apply({"params": params}, y, layers=(start, stop), interm=True)
        found += [] if got is None else [(start, stop, got)]
    assert [(s, t) for s, t, _ in found] == [(3, 4)]
    tol = 1e-6 * float(jnp.std(interm))
    np.testing.assert_allclose(np.asarray(found[0][2]), np.asarray(interm), rtol=0, atol=tol)
    np.testing.assert_allclose(np.asarray(y), np.asarray(emb), rtol=0, atol=1e-6 * float(jnp.std(emb)))

    with pytest.raises(ValueError, match="interm"):
        no_global = dataclasses.replace(cfg, encoder_global_attn_indexes=())
        _encoder(no_global).apply({"params": params}, jnp.asarray(x), interm=True)


# --- The whole SAM-HQ model through the real converter ---


@pytest.fixture(scope="module")
def whole():
    """SAM-HQ's official model (tiny), randomised, its state_dict through `convert_state_dict`
    (SAM-HQ detected from the keys); `Sam.encode_image_hq` of one image on both sides, once."""
    from sam_jax.checkpoints import convert_state_dict
    from tests.reference import official_sam

    cfg = sam_jax.get_config("tiny_hq")
    tm = randomise_(official_sam(cfg), seed=5)
    found, params = convert_state_dict(tm.state_dict())
    assert found == cfg
    model = sam_jax.build_sam(cfg)
    x = np.random.default_rng(5).standard_normal((1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
    emb, hq_features = jax.jit(model.apply, static_argnames="method")({"params": params}, x, method="encode_image_hq")
    with torch.no_grad():
        t_emb, interm = tm.image_encoder(to_nchw(x))
    return model, params, tm, (emb, hq_features), (t_emb, interm)


# ~3.5 s of compiling each; the module-level tests above run every combination in the daily tier.
@pytest.mark.parametrize(
    "multimask, hq_token_only",
    [
        pytest.param(True, False, id="multi-sam+hq"),
        pytest.param(True, True, id="multi-hq_only", marks=pytest.mark.full),
        pytest.param(False, False, id="single-sam+hq", marks=pytest.mark.full),
        pytest.param(False, True, id="single-hq_only", marks=pytest.mark.full),
    ],
)
def test_whole_model_through_the_converter(whole, multimask, hq_token_only):
    """`Sam.decode` with the HQ features against the reference's prompt encoder and MaskDecoderHQ,
    as its predictor calls them."""
    model, params, tm, (emb, hq_features), (t_emb, interm) = whole
    s = model.config.image_size
    rng = np.random.default_rng(6)
    coords = rng.uniform(0, s, (3, 2, 2)).astype(np.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1]])
    decode = jax.jit(model.apply, static_argnames=("method", "multimask_output", "hq_token_only"))
    low, iou = decode(
        {"params": params},
        emb,
        coords,
        labels,
        method="decode",
        multimask_output=multimask,
        hq_features=hq_features,
        hq_token_only=hq_token_only,
    )
    with torch.no_grad():
        sparse, dense = tm.prompt_encoder(
            points=(torch.from_numpy(coords), torch.from_numpy(labels)), boxes=None, masks=None
        )
        t_low, t_iou = tm.mask_decoder(
            image_embeddings=t_emb,
            image_pe=tm.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            hq_token_only=hq_token_only,
            interm_embeddings=interm,
        )
    e = model.config.embedding_size
    assert low.shape == t_low.shape == (3, 1, 4 * e, 4 * e)
    # The tolerances of the SAM pipeline (test_parity): logits <= 1e-4 x std, IoU <= 1e-5.
    assert max_rel_err(low, t_low.numpy()) <= 1e-4
    np.testing.assert_allclose(np.asarray(iou), t_iou.numpy(), rtol=0, atol=1e-5)
