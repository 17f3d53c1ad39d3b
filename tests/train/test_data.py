"""Datasets: synthetic data, mask folders, COCO json (polygons, RLE), embedding cache, centres."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sam_jax.train import data as tdata
from sam_jax.train.synthetic import HELDOUT_PHOTOS, TRAIN_PHOTOS, _photo, synthetic_sample


def test_synthetic_is_deterministic_and_disjoint():
    img, masks = synthetic_sample(3, 96, seed=1)
    img2, masks2 = synthetic_sample(3, 96, seed=1)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and masks.dtype == bool
    assert np.array_equal(img, img2) and np.array_equal(masks, masks2)
    assert not np.array_equal(img, synthetic_sample(4, 96, seed=1)[0])
    assert masks.shape[0] >= 1 and masks.reshape(len(masks), -1).any(axis=1).all()
    assert masks.sum(axis=0).max() <= 1  # visible parts never overlap
    assert not set(TRAIN_PHOTOS) & set(HELDOUT_PHOTOS)
    assert not {"cat", "microaneurysms"} & set(TRAIN_PHOTOS)  # a copy of chelsea, a retina-like crop
    with pytest.raises(ValueError, match="split"):
        synthetic_sample(0, 64, split="test")


@pytest.mark.parametrize("name", TRAIN_PHOTOS + HELDOUT_PHOTOS)
def test_every_photo_loads_offline_as_rgb(name):
    photo = _photo(name)  # bundled with scikit-image: no download
    assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8
    assert min(photo.shape[:2]) >= 150  # crops are at least 35% of the short side


def test_prepare_resizes_and_pads():
    img = np.zeros((30, 60, 3), np.uint8)
    m = np.zeros((2, 30, 60), bool)
    m[0, 5:15, 10:30] = True
    m[1, 20:30, 40:60] = True
    s = tdata.prepare([img], [m], 32)
    assert s.images.shape == (1, 32, 32, 3) and tuple(s.sizes[0]) == (16, 32)
    assert s.masks[0].shape == (2, 32, 32) and not s.masks[0][:, 16:].any()  # padding is background
    np.testing.assert_array_equal(np.argwhere(s.masks[0][0]).min(0), [3, 5])  # 5 * 16/30, 10 * 32/60
    with pytest.raises(ValueError, match="masks\\[0\\]"):
        tdata.prepare([img], [m[:, :10]], 32)
    with pytest.raises(ValueError, match="no image"):
        tdata.prepare([img], [np.zeros_like(m)], 32)


def _write_rgb(path, h=40, w=50):
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (h, w, 3), np.uint8)).save(path)


def test_mask_folder_label_png_and_subfolder(tmp_path):
    (tmp_path / "img").mkdir(), (tmp_path / "msk").mkdir(), (tmp_path / "msk" / "b").mkdir()
    _write_rgb(tmp_path / "img" / "a.jpg"), _write_rgb(tmp_path / "img" / "b.png")
    _write_rgb(tmp_path / "img" / "unlabelled.png")
    labels = np.zeros((40, 50), np.uint8)
    labels[2:10, 2:10], labels[20:30, 20:40] = 1, 7
    Image.fromarray(labels).save(tmp_path / "msk" / "a.png")
    for i, sl in enumerate([np.s_[0:5, 0:5], np.s_[10:40, 10:20]]):
        binary = np.zeros((40, 50), np.uint8)
        binary[sl] = 255
        Image.fromarray(binary).save(tmp_path / "msk" / "b" / f"{i}.png")
    s = tdata.load_mask_folder(str(tmp_path / "img"), str(tmp_path / "msk"), 50)
    assert s.names == ["a", "b"] and [len(m) for m in s.masks] == [2, 2]
    assert s.masks[0][0].sum() == 64 and s.masks[1][1].sum() == 300  # same size: nothing resampled
    with pytest.raises(ValueError, match="masks_dir"):
        tdata.load_mask_folder(str(tmp_path / "img"), str(tmp_path / "nope"), 50)


def _runs(m: np.ndarray) -> list:
    """Uncompressed COCO RLE counts: column-major runs, starting with zeros."""
    flat = m.T.reshape(-1).astype(np.uint8)
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    return runs


def _rle_encode_compressed(m: np.ndarray) -> str:
    """COCO's compressed RLE string (pycocotools' rleToString), written independently."""
    runs = _runs(m)
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0 or (c & 0x10) and x == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_coco_polygons_and_rle(tmp_path):
    _write_rgb(tmp_path / "x.png", 40, 50)
    rs = np.random.RandomState(3)
    blob = np.zeros((40, 50), bool)
    blob[rs.randint(0, 40, 300), rs.randint(0, 50, 300)] = True  # many short runs: deltas < 0 too
    square = np.zeros((40, 50), bool)
    square[10:20, 5:25] = True
    uncompressed = {"size": [40, 50], "counts": _runs(square[::-1])}
    coco = {
        "images": [{"id": 1, "file_name": "x.png", "height": 40, "width": 50}],
        "annotations": [
            {"image_id": 1, "iscrowd": 0, "segmentation": [[5, 10, 25, 10, 25, 20, 5, 20]]},
            {"image_id": 1, "iscrowd": 0, "segmentation": {"size": [40, 50], "counts": _rle_encode_compressed(blob)}},
            {"image_id": 1, "iscrowd": 0, "segmentation": uncompressed},
            {"image_id": 1, "iscrowd": 1, "segmentation": [[0, 0, 10, 0, 10, 10]]},
        ],
    }
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco))
    s = tdata.load_coco(str(path), str(tmp_path), 50)
    assert len(s.masks[0]) == 3  # the crowd annotation is skipped
    np.testing.assert_array_equal(s.masks[0][1, :40], blob)
    poly = s.masks[0][0, :40]
    assert poly[12:18, 7:23].all() and not poly[:8].any()  # pycocotools fills the polygon
    np.testing.assert_array_equal(s.masks[0][2, :40], square[::-1])
    assert _runs(square)[:3] == [5 * 40 + 10, 10, 30]  # the helper's layout: column-major, zeros first


# pycocotools' own decode (inside annToMask) warns under numpy 2 (pycocotools/mask.py): its
# warning, not ours; sam_jax.rle silences it where it calls decode.
@pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning")
def test_coco_annotations_decode_as_the_coco_api(tmp_path):
    """A polygon pair, an uncompressed and a compressed RLE give annToMask's masks exactly."""
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO

    h, w = 37, 53  # odd sizes: a transposed (row-major) decode would not even reshape
    _write_rgb(tmp_path / "y.png", h, w)
    rs = np.random.RandomState(4)
    blob = rs.rand(h, w) < 0.3
    blob[0, 0] = True  # a first run of zero 0s
    ring = [[4.5, 3.2, 30.7, 6.1, 26.3, 20.8, 8.9, 17.4], [33, 25, 50, 28, 41.5, 36]]
    segs = [ring, {"size": [h, w], "counts": _runs(blob)}, {"size": [h, w], "counts": _rle_encode_compressed(~blob)}]
    dataset = {
        "images": [{"id": 7, "file_name": "y.png", "height": h, "width": w}],
        "annotations": [
            {
                "id": i + 1,
                "image_id": 7,
                "iscrowd": 0,
                "segmentation": seg,
                "area": 1.0,
                "bbox": [0, 0, 1, 1],
                "category_id": 1,
            }
            for i, seg in enumerate(segs)
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    api = COCO()
    api.dataset = json.loads(json.dumps(dataset))
    api.createIndex()
    want = np.stack([api.annToMask(a).astype(bool) for a in api.loadAnns(api.getAnnIds(imgIds=[7]))])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(dataset))
    s = tdata.load_coco(str(path), str(tmp_path), w)  # input size = the long side: nothing resampled
    np.testing.assert_array_equal(s.masks[0][:, :h], want)
    np.testing.assert_array_equal(want[1], blob)
    np.testing.assert_array_equal(want[2], ~blob)
    assert want[0][28:31, 39:45].all() and want[0][8:15, 10:25].all()  # both polygons, merged
    for bad, match in (
        ({"size": [h, w + 1], "counts": _runs(blob)}, "size"),
        ({"size": [h, w], "counts": _runs(blob)[:-1]}, "counts sum"),
        ([[1, 2, 3, 4]], "at least 3 points"),
    ):
        dataset["annotations"][0]["segmentation"] = bad
        path.write_text(json.dumps(dataset))
        with pytest.raises(ValueError, match=f"annotation 1 of y.png: segmentation: .*{match}"):
            tdata.load_coco(str(path), str(tmp_path), w)


def test_center_points_and_sample_masks():
    m = np.zeros((2, 20, 30), bool)
    m[0, 2:9, 3:10] = True
    m[1, 10:20, 0:30] = True
    pts = tdata.center_points(m)
    np.testing.assert_array_equal(pts[0], [6, 5])
    assert m[1, int(pts[1, 1]), int(pts[1, 0])]
    s = tdata.Samples(np.zeros((1, 20, 20, 3), np.uint8), np.array([[20, 20]]), [m[:, :, :20]], ["a"])
    out = tdata.sample_masks(np.random.default_rng(0), s, np.array([0, 0]), 3)
    assert out.shape == (2, 3, 20, 20)


def test_sample_images_by_mask_trains_every_mask_equally_often():
    """by="mask" draws images in proportion to their mask counts, so sample_masks then hits every
    mask equally often; by="image" hits a lone mask 4x as often as each of 4 crowded ones (K=1)."""
    s = tdata.Samples(
        np.zeros((3, 8, 8, 3), np.uint8),
        np.full((3, 2), 8),
        [np.ones((k, 8, 8), bool) for k in (1, 2, 4)],
        ["a", "b", "c"],
    )
    draws = 40000
    for by, want in (("image", [1 / 3] * 3), ("mask", [1 / 7, 2 / 7, 4 / 7])):
        idx = tdata.sample_images(np.random.default_rng(0), s, draws, by)
        freq = np.bincount(idx, minlength=3) / draws
        np.testing.assert_allclose(freq, want, atol=0.01)  # binomial sd at 40000 draws: <= 0.0025
    per_mask = np.bincount(idx, minlength=3) / np.array([1, 2, 4])  # by="mask", one mask per draw
    np.testing.assert_allclose(per_mask / per_mask.mean(), 1.0, atol=0.04)
    np.testing.assert_array_equal(
        tdata.sample_images(np.random.default_rng(5), s, 7, "mask"),
        tdata.sample_images(np.random.default_rng(5), s, 7, "mask"),
    )
    with pytest.raises(ValueError, match="by must be one of"):
        tdata.sample_images(np.random.default_rng(0), s, 2, "pixel")
    with pytest.raises(ValueError, match="n must be >= 1"):
        tdata.sample_images(np.random.default_rng(0), s, 0)


def test_augment_keeps_images_and_masks_aligned():
    rng = np.random.default_rng(0)
    s, b = 16, 24
    images = rng.integers(0, 256, (b, s, s, 3)).astype(np.uint8)
    sizes = np.array([[16, 16], [10, 16], [16, 7]] * 8)
    masks = np.zeros((b, 2, s, s), bool)
    for i, (h, w) in enumerate(sizes):
        images[i, h:], images[i, :, w:] = 0, 0
        masks[i, 0, 1:4, 2:3] = True  # asymmetric, so every flip and transpose moves it
        masks[i, 1, : h // 2, : w // 2] = True
        images[i, masks[i, 0]] = (255, 0, 0)
    out_i, out_m = tdata.augment(np.random.default_rng(1), images, sizes, masks, colour=False)
    assert out_m.sum(axis=(2, 3)).tolist() == masks.sum(axis=(2, 3)).tolist()
    moved = 0
    for i, (h, w) in enumerate(sizes):
        assert not out_m[i, :, h:].any() and not out_m[i, :, :, w:].any()  # padding stays bottom/right
        assert not out_i[i, h:].any() and not out_i[i, :, w:].any()
        # The red pixels moved with their mask, and the pixel multiset is unchanged.
        assert (out_i[i][out_m[i, 0]] == (255, 0, 0)).all()
        assert sorted(map(tuple, out_i[i].reshape(-1, 3))) == sorted(map(tuple, images[i].reshape(-1, 3)))
        moved += not np.array_equal(out_m[i], masks[i])
    assert moved > b // 2  # 3/4 of square images and 3/4 of the others are moved
    # Transposes only where the valid region is square: other images keep their mask's orientation.
    for i, (h, w) in enumerate(sizes):
        ys, xs = np.nonzero(out_m[i, 0])
        assert np.ptp(ys) + 1 == 3 or h == w
    again = tdata.augment(np.random.default_rng(1), images, sizes, masks, colour=False)
    assert all(np.array_equal(x, y) for x, y in zip(again, (out_i, out_m)))
    col_i, col_m = tdata.augment(np.random.default_rng(2), images, sizes, masks, geometric=False)
    np.testing.assert_array_equal(col_m, masks)
    assert col_i.dtype == np.uint8 and not np.array_equal(col_i, images)
    with pytest.raises(ValueError, match="images must be uint8"):
        tdata.augment(rng, images.astype(np.float32), sizes, masks)
    with pytest.raises(ValueError, match="masks must be"):
        tdata.augment(rng, images, sizes, masks[:, :, :8])
    with pytest.raises(ValueError, match="sizes must be"):
        tdata.augment(rng, images, sizes[:3], masks)


def test_cache_embeddings_reuses_matching_file(tmp_path):
    s = tdata.Samples(
        np.zeros((5, 8, 8, 3), np.uint8), np.full((5, 2), 8), [np.ones((1, 8, 8), bool)] * 5, list("abcde")
    )
    calls = []

    def encode(images, sizes):
        calls.append(len(images))
        return np.full((len(images), 2, 2, 4), float(len(calls)), np.float32)

    path = str(tmp_path / "emb.npz")
    e1 = tdata.cache_embeddings(encode, s, batch_size=2, path=path, tag="w1")
    assert calls == [2, 2, 2] and e1.shape == (5, 2, 2, 4)  # last batch padded to 2, cut back
    e2 = tdata.cache_embeddings(encode, s, batch_size=2, path=path, tag="w1")
    assert len(calls) == 3 and np.array_equal(e1, e2)  # reused
    tdata.cache_embeddings(encode, s, batch_size=2, path=path, tag="w2")
    assert len(calls) == 6  # other weights: recomputed
