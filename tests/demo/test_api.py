"""The demo's JSON API in-process (Starlette's TestClient) on the tiny model: the answers equal
`SamPredictor` / `SamAutomaticMaskGenerator` on the same image, the held images are an LRU, and
every bad input is a 4xx with a message, never a 500."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from sam_jax import SamAutomaticMaskGenerator, SamPredictor
from sam_jax.demo import create_app
from sam_jax.rle import coco_to_mask

from .conftest import PHOTO, H, W, decode_png, encode

PHOTO_PNG = encode(PHOTO)
POINTS = [[300, 200, 1], [100, 350, 0]]
BOX = [200, 100, 450, 300]


def in_fresh_thread(fn):
    """fn() in a new thread: as the server's worker sees jax's configuration (the suite's
    thread-local matmul precision is not there), so its programs are the server's."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.fixture(scope="module")
def uploaded(client) -> str:
    r = client.post("/api/image", content=PHOTO_PNG)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (W, H) and body["seconds"] >= 0 and "preview" not in body
    return body["id"]


@pytest.fixture(scope="module")
def reference(tiny) -> SamPredictor:
    def make():
        p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
        p.set_image(PHOTO)
        return p

    return in_fresh_thread(make)


def masks_of(body) -> np.ndarray:
    ims = [decode_png(m) for m in body["masks"]]
    assert all(im.mode == "1" and im.size == (W, H) for im in ims)
    assert all(im.info.get("transparency") == 0 for im in ims)  # background transparent
    return np.stack([np.asarray(im) for im in ims])


def test_page_and_info(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="canvas"' in r.text and "static/app.js" in r.text
    assert client.get("/static/app.js").status_code == 200
    info = client.get("/api/info").json()
    assert info["model"] == "tiny" and info["cache_size"] == 8
    assert info["everything"] == {"points_per_side": 16, "pred_iou_thresh": 0.88, "stability_score_thresh": 0.95}


@pytest.mark.parametrize(
    "prompt",
    [
        {"points": POINTS},
        # ~6 s each, most of it compiling the decoder for another prompt shape and mode.
        pytest.param({"points": POINTS[:1], "box": BOX}, marks=pytest.mark.full),
        pytest.param({"box": BOX, "multimask": False}, marks=pytest.mark.full),
    ],
    ids=["points", "points+box", "box-single"],
)
def test_predict_equals_predictor(client, uploaded, reference, prompt):
    r = client.post("/api/predict", json={"id": uploaded, **prompt})
    assert r.status_code == 200, r.text
    body = r.json()
    pts = prompt.get("points")
    coords = np.array([p[:2] for p in pts], np.float64) if pts else None
    labels = np.array([p[2] for p in pts]) if pts else None
    box = np.array(prompt["box"], np.float64) if "box" in prompt else None
    multimask = prompt.get("multimask", True)
    masks, scores, _ = in_fresh_thread(lambda: reference.predict(coords, labels, box, multimask_output=multimask))
    assert len(body["masks"]) == (3 if multimask else 1)
    np.testing.assert_array_equal(masks_of(body), masks)  # the same programs on the same inputs
    np.testing.assert_allclose(body["scores"], scores, rtol=0, atol=1e-6)  # float32 -> JSON float64
    assert body["best"] == int(np.argmax(scores)) and body["areas"] == [int(m.sum()) for m in masks]


def test_exif_orientation_applied(client):
    """A JPEG whose EXIF says "rotate 90": the server's frame is the image as displayed (W x H swapped)."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    r = client.post("/api/image", content=encode(PHOTO, "JPEG", exif=exif.tobytes()))
    assert r.status_code == 200, r.text
    assert (r.json()["width"], r.json()["height"]) == (H, W)


def test_preview_for_the_browser(client):
    r = client.post("/api/image?preview=1", content=encode(PHOTO[:64, :96], "TIFF"))
    assert r.status_code == 200, r.text
    preview = decode_png(r.json()["preview"])  # Pillow opens any format: this one is a JPEG
    assert preview.format == "JPEG" and preview.size == (96, 64)


@pytest.mark.full  # ~10 s: compiles the generator's programs
def test_everything_equals_generator(client, uploaded, reference, tiny):
    options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    r = client.post("/api/everything", json={"id": uploaded, **options})
    assert r.status_code == 200, r.text
    body = r.json()

    def generate():
        gen = SamAutomaticMaskGenerator(tiny.model, tiny.params, output_mode="binary_mask", **options)
        return gen.generate_from_embedding(reference.image_embeddings[0], (H, W))

    expected = in_fresh_thread(generate)
    assert body["count"] == len(expected) == len(body["records"]) > 0
    # The records `sam-jax amg --output-mode coco_rle` writes: the generator's, segmentations as COCO RLE.
    for got, want in zip(body["records"], expected):
        assert set(got) == set(want)
        assert got["segmentation"]["size"] == [H, W] and isinstance(got["segmentation"]["counts"], str)
        np.testing.assert_array_equal(coco_to_mask(got["segmentation"], H, W), want["segmentation"])
        assert got["area"] == want["area"] and got["bbox"] == want["bbox"]
        assert got["predicted_iou"] == pytest.approx(want["predicted_iou"], abs=1e-6)
    labels = decode_png(body["labels"])
    assert labels.mode == "P" and labels.size == (W, H) and labels.info.get("transparency") == 0
    values = np.asarray(labels)
    # Larger masks are painted first: a pixel shows the smallest mask that covers it.
    order = sorted(range(len(expected)), key=lambda k: -expected[k]["area"])
    want = np.zeros((H, W), np.uint8)
    for k in order:
        want[expected[k]["segmentation"]] = 1 + k
    np.testing.assert_array_equal(values, want)


@pytest.mark.full  # ~5 s: six uploads to two fresh apps
def test_held_images_are_an_lru(tiny):
    """cache_size=2: a third image drops the least recently used one, whose id then answers 404."""
    with TestClient(create_app(tiny.model, tiny.params, cache_size=2)) as c:
        # One photo uploaded again and again: each upload is a new image to the server.
        a, b, d = (c.post("/api/image", content=PHOTO_PNG).json()["id"] for _ in range(3))
        # a was dropped by d; b is held.
        r = c.post("/api/predict", json={"id": a, "points": [[10, 10, 1]]})
        assert r.status_code == 404
        assert r.json() == {
            "error": "this image is no longer held by the server (only the last 2 are kept): open it again"
        }
        assert c.post("/api/predict", json={"id": b, "points": [[10, 10, 1]]}).status_code == 200
        # b was used last, so e drops d, not b.
        c.post("/api/image", content=PHOTO_PNG)
        assert c.post("/api/everything", json={"id": d}).status_code == 404
        assert c.post("/api/predict", json={"id": b, "box": [0, 0, 5, 5]}).status_code == 200
    with TestClient(create_app(tiny.model, tiny.params, cache_size=1)) as c:
        first = c.post("/api/image", content=PHOTO_PNG).json()["id"]
        c.post("/api/image", content=PHOTO_PNG)
        r = c.post("/api/predict", json={"id": first, "points": [[10, 10, 1]]})
        assert r.status_code == 404 and "only the last one is kept" in r.json()["error"]


TRUNCATED = PHOTO_PNG[:5000]


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"", 400, "the request body is empty"),
        (b"GIF89a but not really", 400, "not an image this server can read"),
        (b"hello, this is text", 400, "not an image this server can read"),
        (TRUNCATED, 400, "cannot read the image"),
        (encode(np.zeros((2, 2000, 3), np.uint8)), 400, "the model cannot take this image"),
        (encode(np.zeros((60, 60), np.float32), "TIFF"), 200, None),  # float pixels in [0, 1]: taken
        (encode(np.full((60, 60), 2.0, np.float32), "TIFF"), 400, "must lie in [0, 1]"),
    ],
    ids=["empty", "fake-gif", "text", "truncated", "too-elongated", "float-tiff-ok", "float-tiff-out-of-range"],
)
def test_bad_uploads(client, body, status, message):
    r = client.post("/api/image", content=body)
    if message is None:
        assert r.status_code == status, r.text
        return
    assert r.status_code == status and message in r.json()["error"], r.text


def test_upload_limits(tiny, monkeypatch):
    from PIL import Image as PILImage

    with TestClient(create_app(tiny.model, tiny.params, max_pixels=H * W - 1, max_bytes=600_000)) as c:
        r = c.post("/api/image", content=PHOTO_PNG)
        assert r.status_code == 413 and r.json()["error"].startswith("the image is 600x400 pixels (0.2 megapixels)")
        r = c.post("/api/image", content=b"\0" * 600_001)
        assert r.status_code == 413 and r.json()["error"] == "the image is larger than this server takes (0.6 MB)"
        r = c.post("/api/image", content=iter([b"\0" * 400_000, b"\0" * 400_000]))  # no Content-Length
        assert r.status_code == 413
        r = c.post("/api/image", content=b"x", headers={"content-length": "abc"})
        assert r.status_code == 400
        r = c.post("/api/image?preview=yes", content=encode(PHOTO[:10]))
        assert r.status_code == 400 and "preview must be 0 or 1" in r.json()["error"]
    # Pillow's own guard: more than twice MAX_IMAGE_PIXELS is a decompression bomb (refused from the header).
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", (H * W) // 2 - 1)
    with TestClient(create_app(tiny.model, tiny.params)) as c:
        r = c.post("/api/image", content=PHOTO_PNG)
        assert r.status_code == 413 and "decompression bomb" in r.json()["error"], r.text


@pytest.mark.parametrize(
    "body, message",
    [
        ("{", "not valid JSON"),
        (b"\xff\xfe{", "not valid JSON"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ("[1, 2]", "must be a JSON object"),
        ('{"id": "X", "points": [[NaN, 1, 1]]}', "NaN, which is not a JSON number"),
        ('{"id": "X", "points": [[Infinity, 1, 1]]}', "Infinity, which is not a JSON number"),
        ({"points": [[1, 1, 1]]}, "missing field(s) id"),
        ({"id": "X", "point": [[1, 1, 1]]}, "unknown field(s) 'point'"),
        ({"id": 7, "points": [[1, 1, 1]]}, "id must be the string"),
        ({"id": "X", "points": "1,1"}, "points must be a list"),
        ({"id": "X", "points": [[1, 1]]}, "points[0] must be [x, y, label]"),
        ({"id": "X", "points": [[1, 1, 1], "a"]}, "points[1] must be [x, y, label]"),
        ({"id": "X", "points": [["1", 1, 1]]}, "points[0] x must be a number"),
        ({"id": "X", "points": [[True, 1, 1]]}, "points[0] x must be a number"),
        ({"id": "X", "points": [[1, None, 1]]}, "points[0] y must be a number"),
        ('{"id": "X", "points": [[1e999, 1, 1]]}', "points[0] x must be a finite number"),
        ({"id": "X", "points": [[10**400, 1, 1]]}, "points[0] x must be a finite number"),
        ({"id": "X", "points": [[-0.5, 1, 1]]}, "points[0] (-0.5, 1) is outside the 600x400 (W x H) image"),
        ({"id": "X", "points": [[1, 400.5, 1]]}, "outside the 600x400"),
        ({"id": "X", "points": [[1, 1, 2]]}, "label must be 1 (foreground) or 0 (background)"),
        ({"id": "X", "points": [[1, 1, True]]}, "label must be 1"),
        ({"id": "X", "points": [[1, 1, 1]] * 65}, "65 points: at most 64"),
        ({"id": "X", "box": [1, 2, 3]}, "box must be [x0, y0, x1, y1] or null"),
        ({"id": "X", "box": [10, 10, 5, 20]}, "has x1 < x0 or y1 < y0"),
        ({"id": "X", "box": [10, 10, 700, 20]}, "box corner (700, 20) is outside"),
        ({"id": "X", "box": [0, 0, 1, "2"]}, "box[3] must be a number"),
        ({"id": "X"}, "give at least one point or a box"),
        ({"id": "X", "points": [], "box": None}, "give at least one point or a box"),
        ({"id": "X", "points": [[1, 1, 1]], "multimask": "yes"}, "multimask must be true or false"),
    ],
)
def test_bad_predict_requests(client, uploaded, body, message):
    if isinstance(body, dict):
        body = json.dumps({k: uploaded if v == "X" else v for k, v in body.items()})
    elif isinstance(body, str):
        body = body.replace('"X"', json.dumps(uploaded))
    r = client.post("/api/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()["error"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"points_per_side": 0}, "points_per_side must be a whole number from 1 to 64"),
        ({"points_per_side": 65}, "from 1 to 64"),
        ({"points_per_side": 1.5}, "from 1 to 64"),
        ({"points_per_side": "16"}, "from 1 to 64"),
        ({"points_per_side": None}, "from 1 to 64"),
        ({"pred_iou_thresh": "high"}, "pred_iou_thresh must be a number"),
        ({"stability_score_thresh": None}, "stability_score_thresh must be a number"),
        ({"crop_n_layers": 1}, "unknown field(s) 'crop_n_layers'"),
    ],
)
def test_bad_everything_requests(client, uploaded, options, message):
    r = client.post("/api/everything", json={"id": uploaded, **options})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_other_refusals(client, uploaded):
    r = client.post("/api/predict", json={"id": "0123456789abcdef", "points": [[1, 1, 1]]})
    assert r.status_code == 404 and "open it again" in r.json()["error"]
    # A malformed request is told so first, even for an image the server does not hold.
    r = client.post("/api/predict", json={"id": "0123456789abcdef", "points": [[1, 1, 5]]})
    assert r.status_code == 400
    r = client.post("/api/predict", content=b" " * ((1 << 20) + 1))
    assert r.status_code == 413 and "larger than this server takes" in r.json()["error"]
    r = client.get("/api/predict")
    assert r.status_code == 405 and r.json() == {"error": "GET /api/predict: Method Not Allowed"}
    r = client.post(
        "/api/predict", json={"id": uploaded, "points": [[1, 1, 1]]}, headers={"origin": "http://a.example"}
    )
    assert r.status_code == 403 and r.json() == {
        "error": "a request from another site's page (http://a.example) is refused"
    }
    r = client.post("/api/image", content=encode(PHOTO[:8]), headers={"origin": "http://testserver"})  # its own page
    assert r.status_code == 200
    r = client.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "GET /api/nothing: Not Found"}
    # The server still answers.
    assert client.post("/api/predict", json={"id": uploaded, "points": [[1, 1, 1]]}).status_code == 200


def test_create_app_checks_its_arguments(tiny):
    with pytest.raises(TypeError, match="model must be a sam_jax.Sam"):
        create_app("vit_b", tiny.params)
    with pytest.raises(ValueError, match="cache_size must be an int >= 1"):
        create_app(tiny.model, tiny.params, cache_size=0)


def test_worker_ends_with_the_app(tiny):
    def workers() -> int:
        return sum(t.name == "sam_jax demo model" for t in threading.enumerate())

    before = workers()
    with TestClient(create_app(tiny.model, tiny.params)) as c:
        assert c.post("/api/image", content=b"not an image").status_code == 400  # a job: the worker starts
        assert workers() == before + 1
    deadline = time.monotonic() + 30
    while workers() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert workers() == before


@pytest.mark.full  # ~10 s: the decoder and the encoder compiled again in bfloat16
def test_bfloat16_model(tiny):
    """`sam-jax demo --dtype bfloat16` serves `model.clone(dtype=bfloat16)`: the masks a
    bfloat16 SamPredictor gives, and segment everything runs."""
    import jax.numpy as jnp

    model = tiny.model.clone(dtype=jnp.bfloat16)

    def make():
        p = SamPredictor(model, tiny.params, compile_ahead=False)
        p.set_image(PHOTO)
        return p

    reference = in_fresh_thread(make)
    with TestClient(create_app(model, tiny.params)) as c:
        image_id = c.post("/api/image", content=PHOTO_PNG).json()["id"]
        r = c.post("/api/predict", json={"id": image_id, "points": POINTS})
        assert r.status_code == 200, r.text
        coords, labels = np.array([p[:2] for p in POINTS], np.float64), np.array([p[2] for p in POINTS])
        masks, scores, _ = in_fresh_thread(lambda: reference.predict(coords, labels))
        np.testing.assert_array_equal(masks_of(r.json()), masks)
        r = c.post("/api/everything", json={"id": image_id, "points_per_side": 4, "pred_iou_thresh": 0.0})
        assert r.status_code == 200, r.text


@pytest.mark.full  # ~25 CPU-s: SAM-HQ's predictor and generator programs compiled; the daily tier keeps the refusals
def test_hq_token_only(tiny_hq):
    """SAM-HQ weights: /api/info says so (the page then shows its "HQ token only" box) and
    predict passes hq_token_only to the predictor: the HQ mask alone, not SAM's + the HQ mask."""

    def make():
        p = SamPredictor(tiny_hq.model, tiny_hq.params, compile_ahead=False)
        p.set_image(PHOTO)
        return p

    reference = in_fresh_thread(make)
    coords, labels = np.array([p[:2] for p in POINTS], np.float64), np.array([p[2] for p in POINTS])
    with TestClient(create_app(tiny_hq.model, tiny_hq.params)) as c:
        assert c.get("/api/info").json()["hq"] is True
        image_id = c.post("/api/image", content=PHOTO_PNG).json()["id"]
        for flag in (True, False):
            r = c.post("/api/predict", json={"id": image_id, "points": POINTS, "hq_token_only": flag})
            assert r.status_code == 200, r.text
            masks, _, _ = in_fresh_thread(lambda: reference.predict(coords, labels, hq_token_only=flag))
            np.testing.assert_array_equal(masks_of(r.json()), masks)  # the same programs on the same inputs
        hq_only = in_fresh_thread(lambda: reference.predict(coords, labels, hq_token_only=True))[0]
        assert not np.array_equal(hq_only, masks)  # the flag changes the answer
        # "Segment everything" on SAM-HQ: the generator's masks from the held embedding and HQ features.
        options = {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
        r = c.post("/api/everything", json={"id": image_id, **options})
        assert r.status_code == 200, r.text
        gen = SamAutomaticMaskGenerator(tiny_hq.model, tiny_hq.params, output_mode="binary_mask", **options)
        expected = in_fresh_thread(lambda: gen.generate(PHOTO))
        assert r.json()["count"] == len(expected) > 0


@pytest.mark.parametrize(
    "value, message",
    [(True, "hq_token_only=True needs a SAM-HQ model"), ("yes", "hq_token_only must be true or false")],
)
def test_hq_token_only_refused(client, uploaded, value, message):
    assert client.get("/api/info").json()["hq"] is False
    r = client.post("/api/predict", json={"id": uploaded, "points": POINTS, "hq_token_only": value})
    assert r.status_code == 400 and message in r.json()["error"], r.text
