"""Datasets for fine-tuning: folders of images + masks, COCO json, batching and embedding caches.

Host side (numpy + Pillow). A dataset is `Samples`: images resized so their longest side is the
model input size S and zero-padded to (N, S, S, 3) uint8, their resized (h, w), and per image a
stack of K_i >= 1 boolean masks in the same S x S model-input frame (padding is background).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from ..rle import coco_to_mask
from ..transforms import get_preprocess_shape, pad_to_square, resize_longest_side

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclasses.dataclass
class Samples:
    """images: uint8 (N, S, S, 3) padded RGB; sizes: int (N, 2) resized (h, w); masks: N bool
    arrays (K_i, S, S) in the model-input frame; names: N identifiers (file stems)."""

    images: np.ndarray
    sizes: np.ndarray
    masks: List[np.ndarray]
    names: List[str]

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])


def prepare(
    images: Sequence[np.ndarray], masks: Sequence[np.ndarray], image_size: int, names: Optional[Sequence[str]] = None
) -> Samples:
    """Original uint8 (H, W, 3) images and bool (K, H, W) masks -> `Samples` at input size S.

    Images are resized with Pillow's bilinear (as the official preprocessing), masks with nearest
    neighbour to the same (h, w); both are padded bottom/right. Images without masks are dropped."""
    out_i, out_m, sizes, out_n = [], [], [], []
    for i, (img, m) in enumerate(zip(images, masks)):
        img, m = np.asarray(img), np.asarray(m, bool)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"images[{i}] must be uint8 (H, W, 3), got {img.dtype} {img.shape}")
        if m.ndim != 3 or m.shape[1:] != img.shape[:2]:
            raise ValueError(f"masks[{i}] must be (K, H, W) with (H, W) = {img.shape[:2]}, got {m.shape}")
        m = m[m.reshape(len(m), -1).any(axis=1)]
        if not len(m):
            continue
        h, w = get_preprocess_shape(*img.shape[:2], image_size)
        resized = [np.asarray(Image.fromarray(x.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)) > 127 for x in m]
        padded = np.zeros((len(m), image_size, image_size), bool)
        padded[:, :h, :w] = np.stack(resized)
        padded = padded[padded.reshape(len(padded), -1).any(axis=1)]
        if not len(padded):
            continue
        out_i.append(pad_to_square(resize_longest_side(img, image_size), image_size))
        out_m.append(padded)
        sizes.append((h, w))
        out_n.append(str(names[i]) if names is not None else str(i))
    if not out_i:
        raise ValueError("no image with a non-empty mask")
    return Samples(np.stack(out_i), np.asarray(sizes, np.int32), out_m, out_n)


def _read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def _mask_stack(path: str) -> np.ndarray:
    """A mask PNG -> (K, H, W): a binary image is one object; a label image (several non-zero
    values) gives one object per value."""
    with Image.open(path) as im:
        a = np.asarray(im if im.mode in ("1", "L", "P", "I", "I;16") else im.convert("L")).astype(np.int64)
    values = [v for v in np.unique(a) if v != 0]
    if len(values) == 1:
        return (a != 0)[None]
    return np.stack([a == v for v in values]) if values else np.zeros((0, *a.shape), bool)


def load_mask_folder(images_dir: str, masks_dir: str, image_size: int) -> Samples:
    """Images in `images_dir`; for image STEM.ext, masks in `masks_dir` as either STEM.png (binary,
    or one object per non-zero label) or a folder STEM/ of binary PNGs (one object each)."""
    if not os.path.isdir(images_dir):
        raise ValueError(f"images_dir: no such folder {images_dir!r}")
    if not os.path.isdir(masks_dir):
        raise ValueError(f"masks_dir: no such folder {masks_dir!r}")
    images, masks, names = [], [], []
    for fn in sorted(os.listdir(images_dir)):
        stem, ext = os.path.splitext(fn)
        if ext.lower() not in IMAGE_EXTS:
            continue
        single, folder = os.path.join(masks_dir, stem + ".png"), os.path.join(masks_dir, stem)
        if os.path.isfile(single):
            m = _mask_stack(single)
        elif os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(".png"))
            m = np.concatenate([_mask_stack(os.path.join(folder, f)) != 0 for f in files]) if files else None
        else:
            continue
        img = _read_rgb(os.path.join(images_dir, fn))
        if m is None or m.shape[1:] != img.shape[:2]:
            raise ValueError(f"masks of {fn} missing or not of the image's size {img.shape[:2]}")
        images.append(img), masks.append(m), names.append(stem)
    if not images:
        raise ValueError(f"no image in {images_dir!r} has a mask in {masks_dir!r}")
    return prepare(images, masks, image_size, names)


def load_coco(json_path: str, images_dir: str, image_size: int) -> Samples:
    """A COCO instances json (polygons or RLE; crowd annotations skipped) + its image folder.

    Each annotation becomes the mask `pycocotools.coco.COCO.annToMask` gives it (`coco_to_mask`)."""
    with open(json_path) as f:
        coco = json.load(f)
    anns: Dict[int, list] = {}
    for a in coco.get("annotations", []):
        if not a.get("iscrowd", 0):
            anns.setdefault(a["image_id"], []).append(a)
    images, masks, names = [], [], []
    for info in coco.get("images", []):
        if info["id"] not in anns:
            continue
        img = _read_rgb(os.path.join(images_dir, info["file_name"]))
        h, w = img.shape[:2]
        stack = []
        for a in anns[info["id"]]:
            try:
                stack.append(coco_to_mask(a["segmentation"], h, w))
            except ValueError as e:
                raise ValueError(f"{json_path}: annotation {a.get('id')} of {info['file_name']}: {e}") from None
        images.append(img), masks.append(np.stack(stack)), names.append(os.path.splitext(info["file_name"])[0])
    if not images:
        raise ValueError(f"{json_path}: no image with a non-crowd annotation")
    return prepare(images, masks, image_size, names)


SAMPLING = ("image", "mask")


def sample_images(rng: np.random.Generator, samples: Samples, n: int, by: str = "image") -> np.ndarray:
    """`n` image indices (with replacement) for a batch.

    by="image": every image equally often. by="mask": in proportion to its number of masks, so that
    with `sample_masks` every mask is trained equally often in expectation, as a per-mask mean IoU
    weighs them (uniform images under-train the masks of crowded images: with K masks per draw,
    each mask of an image with n >= K masks is drawn K/n times as often as a lone mask)."""
    if by not in SAMPLING:
        raise ValueError(f"by must be one of {SAMPLING}, got {by!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if by == "image":
        return rng.integers(0, len(samples), n)
    counts = np.array([len(m) for m in samples.masks], np.float64)
    return rng.choice(len(samples), n, p=counts / counts.sum())


def sample_masks(rng: np.random.Generator, samples: Samples, indices: np.ndarray, objects_per_image: int) -> np.ndarray:
    """For each image index, `objects_per_image` of its masks drawn without replacement when it
    has enough (with replacement otherwise) -> bool (B, K, S, S)."""
    out = []
    for i in indices:
        m = samples.masks[int(i)]
        pick = rng.choice(len(m), objects_per_image, replace=len(m) < objects_per_image)
        out.append(m[pick])
    return np.stack(out)


def augment(
    rng: np.random.Generator,
    images: np.ndarray,
    sizes: np.ndarray,
    masks: np.ndarray,
    colour: bool = True,
    geometric: bool = True,
):
    """Random label-preserving augmentation of a batch in the model-input frame.

    Args:
      images: uint8 (B, S, S, 3) padded RGB; sizes: int (B, 2) their valid (h, w);
      masks: bool (B, K, S, S), the ground truth of each image.
      colour: per image, a random permutation of the RGB channels, a gain in [0.7, 1.3] per
        channel and a brightness offset in [-25, 25] (padding is zeroed later by
        `preprocess_padded`, so it needs no care here).
      geometric: per image, random flips of the valid region (padding stays bottom/right), and a
        transpose when the valid region is square: all 8 symmetries of a square image.

    Returns new (images, masks); the valid sizes are unchanged. Deterministic given `rng`.
    """
    images, sizes, masks = np.asarray(images), np.asarray(sizes), np.asarray(masks)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (B, S, S, 3), got {images.dtype} {images.shape}")
    if masks.ndim != 4 or masks.shape[0] != images.shape[0] or masks.shape[2:] != images.shape[1:3]:
        raise ValueError(f"masks must be (B, K, S, S) matching images {images.shape}, got {masks.shape}")
    s = images.shape[1]
    if sizes.shape != (len(images), 2) or (sizes < 1).any() or (sizes > s).any():
        raise ValueError(
            f"sizes must be (B, 2) valid (h, w) in 1..{s} for images {images.shape}, got shape {sizes.shape}"
        )
    out_i, out_m = images.copy(), masks.copy()
    for b in range(len(images)):
        h, w = (int(v) for v in sizes[b])
        img, m = images[b, :h, :w], masks[b, :, :h, :w]
        if geometric:
            if rng.random() < 0.5:
                img, m = img[:, ::-1], m[:, :, ::-1]
            if rng.random() < 0.5:
                img, m = img[::-1], m[:, ::-1]
            if h == w and rng.random() < 0.5:
                img, m = img.transpose(1, 0, 2), m.transpose(0, 2, 1)
        if colour:
            gain = rng.uniform(0.7, 1.3, 3).astype(np.float32)
            shift = np.float32(rng.uniform(-25.0, 25.0))
            img = np.clip(img[..., rng.permutation(3)].astype(np.float32) * gain + shift, 0, 255)
        out_i[b, :h, :w] = img.astype(np.uint8)
        out_m[b, :, :h, :w] = m
    return out_i, out_m


DICT_PREFIX = "dict_"  # cache files: the entries of a dict result, prefixed (an array is "embeddings")


def cache_embeddings(encode, samples: Samples, batch_size: int = 8, path: Optional[str] = None, tag: str = ""):
    """Image embeddings (N, h, w, C) float32 of every image, computed once in batches of
    `batch_size` with `encode(images uint8 (B, S, S, 3), sizes (B, 2)) -> (B, h, w, C)`.

    `encode` may also return a dict of such per-image arrays (SAM-HQ: `step.encoder_outputs`'s
    "embeddings" and "interm_embeddings"); the result is then a dict of (N, ...) float32 arrays.
    With `path` (.npz) they are stored and reused on the next call if the file's `tag` (identify
    the weights and model with it) and image count match."""
    if path and os.path.isfile(path):
        with np.load(path) as z:
            names = [n for n in z.files if n != "tag"]
            if str(z["tag"]) == tag and names and all(len(z[n]) == len(samples) for n in names):
                if names == ["embeddings"]:
                    return z["embeddings"]
                if all(n.startswith(DICT_PREFIX) for n in names):
                    return {n[len(DICT_PREFIX) :]: z[n] for n in names}
    chunks = []
    for i in range(0, len(samples), batch_size):
        imgs, sizes = samples.images[i : i + batch_size], samples.sizes[i : i + batch_size]
        n = len(imgs)
        if n < batch_size:  # one compiled shape: pad the last batch
            imgs = np.concatenate([imgs, np.zeros((batch_size - n, *imgs.shape[1:]), imgs.dtype)])
            sizes = np.concatenate([sizes, np.ones((batch_size - n, 2), sizes.dtype)])
        out = encode(imgs, sizes)
        out = {k: np.asarray(v)[:n] for k, v in out.items()} if isinstance(out, dict) else {"": np.asarray(out)[:n]}
        chunks.append(out)
    result = {k: np.concatenate([c[k] for c in chunks]).astype(np.float32) for k in chunks[0]}
    as_array = list(result) == [""]
    if path:
        tmp = path + ".tmp.npz"
        stored = {"embeddings": result[""]} if as_array else {DICT_PREFIX + k: v for k, v in result.items()}
        np.savez(tmp, tag=np.array(tag), **stored)
        os.replace(tmp, path)
    return result[""] if as_array else result


def center_points(masks: np.ndarray) -> np.ndarray:
    """The point of each (..., H, W) mask farthest from its boundary (the SAM paper's evaluation
    point) -> (..., 2) float32 (x, y)."""
    from scipy.ndimage import distance_transform_edt

    flat = masks.reshape(-1, *masks.shape[-2:])
    pts = np.zeros((len(flat), 2), np.float32)
    for i, m in enumerate(flat):
        d = distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(d)), d.shape)
        pts[i] = (x, y)
    return pts.reshape(*masks.shape[:-2], 2)
