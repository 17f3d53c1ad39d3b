"""SamPredictor vs the official SamPredictor on the randomised full-size vit_b, vs MobileSAM's
(`mobile_sam`) on the randomised MobileSAM and vs SAM-HQ's (`segment_anything_hq`) on the
randomised SAM-HQ vit_b, on real photos of several sizes and orientations. Each photo is encoded
once per side; many prompts run against it.

Tolerances (measured figures are printed at the end of the module with `-s`):
  * low-res logits: max |err| <= 1e-4 x std(reference): float32 through 12 ViT blocks and the
    decoder in a different op order;
  * IoU predictions: max |err| <= 1e-5 (scores are O(1));
  * masks: equal wherever |reference logit| > 1e-3 (closer to 0 a mask bit is rounding noise).
"""

from __future__ import annotations

from typing import Dict

import numpy as np
import pytest
import skimage.data
from PIL import Image

from sam_jax import SamPredictor
from tests.compilations import COMPILE_EVENTS, count_compilations

# Every test here runs a full-size model (asked for by name inside `photo`, which the automatic
# marking in conftest cannot see).
pytestmark = pytest.mark.full

LOGIT_TOL = 1e-4  # x std(reference logits)
IOU_TOL = 1e-5
CONFIDENT = 1e-3


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


PHOTOS = {
    "landscape_400x600": lambda: skimage.data.coffee(),
    "square_512x512": lambda: skimage.data.astronaut(),
    "portrait_300x180": lambda: skimage.data.chelsea()[:, 150:330],
    "landscape_1500x2000": lambda: _resize(skimage.data.coffee(), 1500, 2000),
    "portrait_1400x900": lambda: _resize(skimage.data.rocket()[:, 100:480], 1400, 900),
}

FIGURES: Dict[str, Dict[str, float]] = {}


@pytest.fixture(scope="module", autouse=True)
def _print_figures():
    yield
    print(f"\n{'photo / prompt':<52} {'low err/std':>11} {'iou err':>9} {'full err/std':>12} {'mismatch':>8}")
    for k, f in FIGURES.items():
        print(f"{k:<52} {f['low']:>11.2e} {f['iou']:>9.2e} {f['full']:>12.2e} {f['mismatch']:>8d}")


# "model:photo": each model's reference predictor is its own package's.
MODELS = {"vit_b": "segment_anything", "mobile_sam": "mobile_sam", "sam_hq_vit_b": "segment_anything_hq"}


@pytest.fixture(scope="module", params=[f"{m}:{p}" for m in MODELS for p in sorted(PHOTOS)])
def photo(request):
    """(name, image, official predictor, ours), each predictor with the image set."""
    import importlib

    model_name, photo_name = request.param.split(":")
    ref = request.getfixturevalue(model_name)
    image = np.ascontiguousarray(PHOTOS[photo_name]())
    official = importlib.import_module(MODELS[model_name]).SamPredictor(ref.torch_model)
    official.set_image(image)
    ours = SamPredictor(ref.model, ref.params, compile_ahead=False)  # counts this thread's compiles only
    ours.set_image(image)
    return request.param, image, official, ours


def prompts(h: int, w: int) -> Dict[str, dict]:
    box = np.array([0.2 * w, 0.25 * h, 0.7 * w, 0.8 * h])
    return {
        "one point": dict(point_coords=np.array([[0.45 * w, 0.55 * h]]), point_labels=np.array([1])),
        "4 points +-": dict(
            point_coords=np.array([[0.3 * w, 0.3 * h], [0.6 * w, 0.4 * h], [0.5 * w, 0.7 * h], [0.1 * w, 0.9 * h]]),
            point_labels=np.array([1, 0, 1, 0]),
        ),
        "box": dict(box=box),
        "box + 2 points": dict(
            box=box, point_coords=np.array([[0.4 * w, 0.5 * h], [0.65 * w, 0.3 * h]]), point_labels=np.array([1, 0])
        ),
    }


def check(name: str, want, got_masks, got_logits) -> None:
    """want: official (logits, iou, low) with return_logits; ours: the same call twice (bool masks
    and logits)."""
    ref_full, ref_iou, ref_low = want
    masks, iou, low = got_masks
    full = got_logits[0]
    np.testing.assert_array_equal(got_logits[2], low)  # return_logits changes only the full output
    conf = np.abs(ref_full) > CONFIDENT
    fig = {
        "low": float(np.max(np.abs(low - ref_low)) / np.std(ref_low)),
        "iou": float(np.max(np.abs(iou - ref_iou))),
        "full": float(np.max(np.abs(full - ref_full)) / np.std(ref_full)),
        "mismatch": int(np.sum(masks[conf] != (ref_full[conf] > 0))),
    }
    FIGURES[name] = fig
    assert masks.dtype == bool and masks.shape == ref_full.shape
    assert fig["low"] <= LOGIT_TOL, fig
    assert fig["full"] <= LOGIT_TOL, fig  # the upscaling is linear: the same relative bound holds
    assert fig["iou"] <= IOU_TOL, fig
    assert fig["mismatch"] == 0, fig


@pytest.mark.parametrize("multimask", [True, False], ids=["multi", "single"])
def test_prompts(photo, multimask):
    name, image, official, ours = photo
    h, w = image.shape[:2]
    for pname, kw in prompts(h, w).items():
        want = official.predict(**kw, multimask_output=multimask, return_logits=True)
        got = ours.predict(**kw, multimask_output=multimask)
        got_logits = ours.predict(**kw, multimask_output=multimask, return_logits=True)
        check(f"{name} {pname} {'multi' if multimask else 'single'}", want, got, got_logits)


# Two photos (a small landscape, a large portrait): the HQ-only mask is one more product of the same
# decoder state, which test_prompts checks on every photo.
@pytest.mark.parametrize("photo", ["sam_hq_vit_b:landscape_400x600", "sam_hq_vit_b:portrait_1400x900"], indirect=True)
@pytest.mark.parametrize("multimask", [True, False], ids=["multi", "single"])
def test_hq_token_only(photo, multimask):
    """SAM-HQ's HQ mask alone (its predictor's hq_token_only=True); test_prompts runs its default."""
    name, image, official, ours = photo
    h, w = image.shape[:2]
    for pname, kw in prompts(h, w).items():
        kw = dict(kw, multimask_output=multimask, hq_token_only=True)
        want = official.predict(**kw, return_logits=True)
        check(f"{name} {pname} hq_token_only", want, ours.predict(**kw), ours.predict(**kw, return_logits=True))


def test_mask_input_from_previous_logits(photo):
    """The official refinement loop: the best low-res logits of one call are the next call's
    mask_input. Both sides get the official logits, so the check stays stage-local."""
    name, image, official, ours = photo
    h, w = image.shape[:2]
    kw = prompts(h, w)["one point"]
    _, scores, low = official.predict(**kw)
    mask_input = low[np.argmax(scores)][None]
    pts = np.concatenate([kw["point_coords"], [[0.2 * w, 0.8 * h]]])
    labels = np.array([1, 0])
    want = official.predict(pts, labels, mask_input=mask_input, multimask_output=False, return_logits=True)
    got = ours.predict(pts, labels, mask_input=mask_input, multimask_output=False)
    got_logits = ours.predict(pts, labels, mask_input=mask_input, multimask_output=False, return_logits=True)
    check(f"{name} mask_input + 2 points single", want, got, got_logits)


def test_embedding(photo):
    name, _, official, ours = photo
    want = official.get_image_embedding().numpy()
    got = ours.get_image_embedding()
    assert got.shape == want.shape and ours.input_size == official.input_size
    err = float(np.max(np.abs(got - want)) / np.std(want))
    FIGURES[f"{name} embedding"] = {"low": err, "iou": 0.0, "full": 0.0, "mismatch": 0}
    assert err <= LOGIT_TOL  # float32 through 12 ViT blocks (vit_b) or ~20 convs and 12 blocks (MobileSAM)


@pytest.mark.parametrize("photo", ["vit_b:landscape_400x600"], indirect=True)
def test_set_image_does_not_recompile(photo):
    """A photo of another size reuses the compiled encoder. Both calls are in this test: the
    suite may drop JAX's caches between tests (conftest), so the first call finds or compiles
    the encoder, and the second, of another size, compiles nothing."""
    _, image, _, ours = photo
    h, w = image.shape[:2]
    ours.set_image(np.ascontiguousarray(image[: h // 2, : 3 * w // 4]))
    with count_compilations(COMPILE_EVENTS[:1]) as events:
        ours.set_image(image)  # the module's image again, for the tests after this one
    assert len(events) == 0


@pytest.mark.parametrize("photo", ["vit_b:landscape_400x600"], indirect=True)
def test_64_boxes_in_one_call_equal_64_calls(photo):
    _, image, _, ours = photo
    h, w = image.shape[:2]
    xy = np.random.default_rng(0).uniform(0, 1, (64, 2, 2)) * [w, h]
    boxes = np.concatenate([xy.min(1), xy.max(1)], axis=1)
    masks, iou, low = ours.predict_batch(boxes=boxes)
    logits = ours.predict_batch(boxes=boxes, return_logits=True)[0]
    errs, iou_errs, mismatch = [], [], 0
    for i, b in enumerate(boxes):
        m1, s1, l1 = ours.predict(box=b)
        errs.append(np.max(np.abs(low[i] - l1)) / np.std(l1))
        iou_errs.append(np.max(np.abs(iou[i] - s1)))
        conf = np.abs(logits[i]) > CONFIDENT
        mismatch += int(np.sum(masks[i][conf] != m1[conf]))
    FIGURES["64 boxes batched vs single"] = {"low": max(errs), "iou": max(iou_errs), "full": 0.0, "mismatch": mismatch}
    # The same computation in another batch shape (other matmul blocking): rounding noise of the
    # order of the cross-framework error (~1.5e-5 x std on vit_b), far below any real difference.
    assert max(errs) <= 5e-5
    assert max(iou_errs) <= IOU_TOL
    assert mismatch == 0
