"""SamPredictor on SAM-HQ against SAM-HQ's own predictor (`segment_anything_hq.SamPredictor`), on
the randomised tiny SAM-HQ converted by the real converter: every prompt kind, multimask on and off,
`hq_token_only` on and off, `predict_batch`. The full-size sam_hq_vit_b runs in
tests/test_predictor_parity.py. Tolerances as there (see its docstring)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from sam_jax import SamPredictor
from tests.test_predictor_parity import check, prompts


@pytest.fixture(scope="module")
def predictors(tiny_hq):
    from segment_anything_hq import SamPredictor as OfficialPredictor

    image = skimage.data.coffee()
    official = OfficialPredictor(tiny_hq.torch_model)
    official.set_image(image)
    ours = SamPredictor(tiny_hq.model, tiny_hq.params, compile_ahead=False)
    ours.set_image(image)
    return image, official, ours


# Each prompt kind and mode compiles its decoder (~2-4 s on 2 cores): the daily tier checks one
# prompt with points and a box (the module-level tests in tests/modeling/test_hq.py check every
# mode of the decoder itself), the whole suite every kind in every mode.
ALL = pytest.mark.full


@pytest.mark.parametrize(
    "multimask, hq_token_only, kinds",
    [
        pytest.param(True, False, ["box + 2 points"], id="multi-sam+hq-daily"),
        pytest.param(True, False, None, id="multi-sam+hq", marks=ALL),
        pytest.param(True, True, None, id="multi-hq_only", marks=ALL),
        pytest.param(False, False, None, id="single-sam+hq", marks=ALL),
        pytest.param(False, True, None, id="single-hq_only", marks=ALL),
    ],
)
def test_prompts(predictors, multimask, hq_token_only, kinds):
    image, official, ours = predictors
    h, w = image.shape[:2]
    for name, kw in prompts(h, w).items():
        if kinds is not None and name not in kinds:
            continue
        kw = dict(kw, multimask_output=multimask, hq_token_only=hq_token_only)
        want = official.predict(**kw, return_logits=True)
        got = ours.predict(**kw)
        assert got[0].shape == (1, h, w)  # SAM-HQ: one mask per prompt, multimask or not
        check(f"tiny_hq {name} {multimask} {hq_token_only}", want, got, ours.predict(**kw, return_logits=True))


@pytest.mark.full  # ~4 s: two more decoder programs
def test_predict_batch_equals_predict(predictors):
    image, _, ours = predictors
    h, w = image.shape[:2]
    boxes = np.array([[0.1 * w, 0.2 * h, 0.6 * w, 0.7 * h], [0.3 * w, 0.1 * h, 0.9 * w, 0.5 * h]])
    masks, iou, low = ours.predict_batch(boxes=boxes, hq_token_only=True)
    assert masks.shape == (2, 1, h, w)
    for i, b in enumerate(boxes):
        _, s1, l1 = ours.predict(box=b, hq_token_only=True)
        np.testing.assert_allclose(low[i], l1, rtol=0, atol=5e-5 * np.std(l1))  # another batch shape: rounding
        np.testing.assert_allclose(iou[i], s1, rtol=0, atol=1e-5)


def test_hq_token_only_needs_sam_hq(tiny, tiny_hq):
    ours = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    ours.set_image(np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="hq_token_only=True needs a SAM-HQ model"):
        ours.predict(point_coords=[[5, 5]], point_labels=[1], hq_token_only=True)
    hq = SamPredictor(tiny_hq.model, tiny_hq.params, compile_ahead=False)
    assert hq.hq_features == ()
    hq.set_image(np.zeros((32, 48, 3), np.uint8))
    (features,) = hq.hq_features
    c = tiny_hq.model.config
    assert features.shape == (1, c.mask_input_size, c.mask_input_size, c.prompt_embed_dim // 8)


@pytest.mark.full  # ~8 s: compiles the generator for SAM-HQ; tests/amg/test_parity.py runs tiny_hq AMG daily
def test_generate_from_embedding_sam_hq(tiny_hq):
    """SAM-HQ's masks from what a predictor holds (embedding + HQ features) are generate(image)'s;
    without the HQ features, or with features of another shape, a clear ValueError."""
    from sam_jax import SamAutomaticMaskGenerator

    image = np.asarray(np.random.default_rng(3).integers(0, 255, (90, 120, 3)), np.uint8)
    amg = SamAutomaticMaskGenerator(
        tiny_hq.model, tiny_hq.params, points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0
    )
    want = amg.generate(image)
    p = SamPredictor(tiny_hq.model, tiny_hq.params, compile_ahead=False)
    p.set_image(image)
    got = amg.generate_from_embedding(p.image_embeddings[0], image.shape[:2], p.hq_features[0])
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g["segmentation"], w["segmentation"])
        # The predictor's and the generator's encoder are separate compilations of the same
        # function: float32 rounding may differ in the last bits.
        assert g["predicted_iou"] == pytest.approx(w["predicted_iou"], abs=1e-5)
    emb = p.image_embeddings[0]
    with pytest.raises(ValueError, match="a SAM-HQ model also needs the image's hq_features"):
        amg.generate_from_embedding(emb, (100, 120))
    with pytest.raises(ValueError, match=r"hq_features must be \(1, 40, 40, 6\)"):
        amg.generate_from_embedding(emb, (100, 120), np.zeros((1, 40, 40, 5), np.float32))
