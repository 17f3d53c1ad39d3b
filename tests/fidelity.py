"""One measurement of fidelity: a `SamPredictor` against the official fp32 `SamPredictor` of the
same (randomised) weights, on real photos and the prompts a user clicks.

`against_official(official_torch_model, predictor)` runs 4 photos x 4 prompt kinds (the parity
test's `prompts`) x 3 masks (multimask output) through both and returns the figures: the worst
photo's embedding mean |error| / std, the worst prompt's low-res logits mean |error| / std, and the
mean and min mask IoU over the 48 masks. Used by the int8 (tests/test_quantize.py) and bf16
(tests/modeling/test_bf16.py) acceptance tests, so their figures are comparable.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict, List, Tuple

import numpy as np

from tests.test_predictor_parity import prompts

PHOTOS = ("coffee_400x600", "astronaut_512x512", "chelsea_300x180", "rocket_427x380")
MASKS = len(PHOTOS) * 4 * 3  # photos x prompt kinds x multimask outputs


def photos() -> Dict[str, np.ndarray]:
    """The four photos, RGB uint8 (H, W, 3), named by their size: landscape, square, portrait and
    a small one (the last two cropped from skimage's)."""
    import skimage.data

    return {
        "coffee_400x600": skimage.data.coffee(),
        "astronaut_512x512": skimage.data.astronaut(),
        "chelsea_300x180": np.ascontiguousarray(skimage.data.chelsea()[:, 150:330]),
        "rocket_427x380": np.ascontiguousarray(skimage.data.rocket()[:, 100:480]),
    }


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree (1.0)."""
    union = np.sum(a | b)
    return 1.0 if union == 0 else float(np.sum(a & b) / union)


# The official outputs per torch model (they do not depend on the predictor under test): the
# model itself is kept with them, so a new model at a reused id() is not mistaken for it.
_OFFICIAL: Dict[int, Tuple[Any, List[Tuple[np.ndarray, List[tuple]]]]] = {}


def official_outputs(official_torch_model) -> List[Tuple[np.ndarray, List[tuple]]]:
    """Per photo (in `photos()` order): the official embedding (1, C, h, w) and, per prompt kind,
    (masks (3, H, W) bool, low-res logits (3, 256, 256)), multimask output."""
    hit = _OFFICIAL.get(id(official_torch_model))
    if hit is not None and hit[0] is official_torch_model:
        return hit[1]
    official = importlib.import_module("segment_anything").SamPredictor(official_torch_model)
    out = []
    for image in photos().values():
        official.set_image(image)
        per_prompt = []
        for kw in prompts(*image.shape[:2]).values():
            masks, _, low = official.predict(**kw, multimask_output=True)
            per_prompt.append((masks, low))
        out.append((official.get_image_embedding().numpy(), per_prompt))
    _OFFICIAL[id(official_torch_model)] = (official_torch_model, out)
    return out


def against_official(official_torch_model, predictor) -> Dict[str, float]:
    """Figures of `predictor` (a `sam_jax.SamPredictor`, any model / dtype / quantization) against
    the official fp32 `SamPredictor` of `official_torch_model` (import `tests` first: it puts the
    torchvision stand-in on the path). Keys: "emb mean err/std", "low-res logits mean err/std"
    (worst photo / prompt), "mean mask IoU", "min mask IoU", "masks" (the count, `MASKS`)."""
    want = official_outputs(official_torch_model)
    ious, emb_errs, logit_errs = [], [], []
    for image, (ref_emb, ref_prompts) in zip(photos().values(), want):
        predictor.set_image(image)
        emb = np.asarray(predictor.get_image_embedding(), np.float32)
        emb_errs.append(float(np.mean(np.abs(emb - ref_emb)) / np.std(ref_emb)))
        for kw, (ref_masks, ref_low) in zip(prompts(*image.shape[:2]).values(), ref_prompts):
            masks, _, low = predictor.predict(**kw, multimask_output=True)
            logit_errs.append(float(np.mean(np.abs(low - ref_low)) / np.std(ref_low)))
            ious += [mask_iou(masks[k], ref_masks[k]) for k in range(3)]
    return {
        "emb mean err/std": max(emb_errs),
        "low-res logits mean err/std": max(logit_errs),
        "mean mask IoU": float(np.mean(ious)),
        "min mask IoU": float(np.min(ious)),
        "masks": len(ious),
    }


def figure_report():
    """(FIGURES, a module-scoped autouse fixture printing FIGURES after the module's tests): a test
    module binds both, `FIGURES, _print_figures = figure_report()`, and its tests record their
    measured figures as FIGURES[name] = {quantity: value}; they print with `-s`."""
    import pytest

    figures: Dict[str, Dict[str, float]] = {}

    @pytest.fixture(scope="module", autouse=True)
    def print_figures():
        yield
        for k, f in figures.items():
            print(f"\n{k}: " + ", ".join(f"{n} {v:.4g}" for n, v in f.items()), end="")
        print()

    return figures, print_figures
