"""A built-in synthetic segmentation dataset: random shapes pasted over real photo backgrounds.

Backgrounds are random crops of scikit-image's bundled photos (no download); shapes are
ellipses, rotated rectangles, triangles, regular polygons and stars, filled with a noisy colour
gradient or a tinted texture cut from another photo. Later shapes occlude earlier ones; each
ground-truth mask is the VISIBLE part of one shape. Sample i is a pure function of (seed, i).

`split="train"` and `split="heldout"` draw backgrounds (and texture fills) from disjoint sets of
photos. Training uses the photos, scans and colour graphics bundled with scikit-image (those that
load without a download), except the held-out three and two that resemble them: `cat` (the same
photo as `chelsea`) and `microaneurysms` (a fundus crop, the held-out `retina`'s kind of image).
Also left out: the binary images, the checkerboard, and the float-valued or tiny ones.
Widening the training set from its first eight photos to these sixteen raised the scratch model's
held-out single-point IoU by about 0.012 (mean of four runs each, seeds 0 and 1: 0.756 -> 0.768 on
each run's own held-out images, 0.735 -> 0.747 on one fixed set), where no optimiser or loss change
tried did better than run-to-run noise (about +-0.01): much of its gap was the shift to unseen photos.
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import numpy as np
from PIL import Image, ImageDraw

TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "camera",
    "brick",
    "grass",
    "cell",
    "clock",
    "coins",
    "moon",
    "page",
    "text",
    "colorwheel",
    "logo",
)
HELDOUT_PHOTOS = ("chelsea", "retina", "gravel")
SPLITS = {"train": TRAIN_PHOTOS, "heldout": HELDOUT_PHOTOS}


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    return np.ascontiguousarray(img[..., :3].astype(np.uint8))


def _crop(rng: np.random.Generator, photo: np.ndarray, size: int) -> np.ndarray:
    h, w = photo.shape[:2]
    side = int(rng.uniform(0.35, 1.0) * min(h, w))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    out = np.asarray(crop)
    return out[:, ::-1] if rng.random() < 0.5 else out


def _shape_polygon(rng: np.random.Generator, cx: float, cy: float, r: float) -> List[Tuple[float, float]]:
    kind = rng.integers(0, 5)
    rot = rng.uniform(0, 2 * np.pi)
    if kind == 0:  # ellipse
        t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        a, b = r, r * rng.uniform(0.45, 1.0)
        xs, ys = a * np.cos(t), b * np.sin(t)
    elif kind == 1:  # rectangle
        a, b = r, r * rng.uniform(0.4, 1.0)
        xs, ys = np.array([-a, a, a, -a]), np.array([-b, -b, b, b])
    elif kind == 2:  # triangle
        t = np.sort(rng.uniform(0, 2 * np.pi, 3))
        xs, ys = r * np.cos(t), r * np.sin(t)
    elif kind == 3:  # regular polygon
        n = rng.integers(5, 9)
        t = np.arange(n) * 2 * np.pi / n
        xs, ys = r * np.cos(t), r * np.sin(t)
    else:  # star
        n = rng.integers(4, 7)
        t = np.arange(2 * n) * np.pi / n
        rad = np.where(np.arange(2 * n) % 2 == 0, r, r * rng.uniform(0.35, 0.6))
        xs, ys = rad * np.cos(t), rad * np.sin(t)
    c, s = np.cos(rot), np.sin(rot)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in zip(xs, ys)]


def _fill(rng: np.random.Generator, size: int, photos: Tuple[str, ...]) -> np.ndarray:
    if rng.random() < 0.3:  # a tinted texture from another photo
        tex = _crop(rng, _photo(photos[rng.integers(len(photos))]), size).astype(np.float32)
        tint = rng.uniform(0.3, 1.3, 3)
        return np.clip(tex * tint + rng.uniform(-40, 40, 3), 0, 255)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[:size, :size] / size
    t = (np.cos(ang) * xx + np.sin(ang) * yy)[..., None]
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    mix = rng.uniform(0, 1)  # how far the gradient goes from c0 towards c1
    col = c0 * (1 - mix * t) + c1 * (mix * t)
    return np.clip(col + rng.normal(0, rng.uniform(2, 20), (size, size, 3)), 0, 255)


def synthetic_sample(
    index: int,
    image_size: int = 256,
    seed: int = 0,
    split: str = "train",
    max_objects: int = 5,
    min_area: float = 0.004,
) -> Tuple[np.ndarray, np.ndarray]:
    """Sample `index`: image uint8 (S, S, 3) RGB and masks bool (K, S, S), K >= 1 visible shapes."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    photos = SPLITS[split]
    rng = np.random.default_rng([seed, index, list(SPLITS).index(split)])
    s = image_size
    image = _crop(rng, _photo(photos[rng.integers(len(photos))]), s).astype(np.float32)
    shapes = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        r = rng.uniform(0.08, 0.24) * s
        cx, cy = rng.uniform(0.1 * s, 0.9 * s, 2)
        canvas = Image.new("L", (s, s), 0)
        ImageDraw.Draw(canvas).polygon(_shape_polygon(rng, cx, cy, r), fill=255)
        m = np.asarray(canvas) > 127
        image = np.where(m[..., None], _fill(rng, s, photos), image)
        shapes.append(m)
    visible, covered = [], np.zeros((s, s), bool)
    for m in reversed(shapes):  # later shapes are on top
        vis = m & ~covered
        covered |= m
        if vis.mean() >= min_area:
            visible.append(vis)
    if not visible:  # cannot happen with the sizes above unless every shape is clipped away
        visible.append(shapes[-1])
    return image.astype(np.uint8), np.stack(visible[::-1])


def synthetic_dataset(
    n: int, image_size: int = 256, seed: int = 0, split: str = "train"
) -> Tuple[np.ndarray, List[np.ndarray]]:
    """n samples: images uint8 (n, S, S, 3) and a list of n bool mask stacks (K_i, S, S)."""
    samples = [synthetic_sample(i, image_size, seed, split) for i in range(n)]
    return np.stack([s[0] for s in samples]), [s[1] for s in samples]
