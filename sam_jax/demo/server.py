"""The demo's ASGI app: one static page and a small JSON API over `SamPredictor` and
`SamAutomaticMaskGenerator`.

    GET  /                 the page (static/index.html; static/ holds its script and style)
    GET  /api/info         {"model", "hq", "cache_size", "max_pixels", "max_bytes", "everything": defaults}
    POST /api/image        body: the image file's bytes -> {"id", "width", "height", "seconds"}
                           (?preview=1 adds "preview", a base64 JPEG, for formats a browser cannot show)
    POST /api/predict      {"id", "points": [[x, y, label], ...], "box": [x0, y0, x1, y1] | null,
                            "multimask": true, "hq_token_only": false}
                           -> {"masks": [base64 PNG, ...], "scores", "areas", "best", "ms"}
                           ("hq" in /api/info: SAM-HQ weights, whose predict takes hq_token_only: true)
    POST /api/everything   {"id", "points_per_side", "pred_iou_thresh", "stability_score_thresh"}
                           -> {"count", "labels": base64 PNG, "records": [...], "seconds"}

Every refusal is JSON {"error": message} with a 4xx status, the message written for the page's
status line: bytes that are not an image, a truncated file, an image over the pixel or byte
limit, malformed JSON, a wrong field, a point outside the image. An id the server no longer holds
is a 404 that says to open the image again. A POST from another site's page (its Origin header
names another host than the server's) is refused with 403.

Memory is bounded: the server holds the embeddings of the last `cache_size` images (the oldest
dropped; each a `SamPredictor`, ~14 MB for any SAM size), plus the one being computed. The model
work runs on one worker thread, in the order requested, so JAX sees one call at a time; the event
loop stays free to answer everything else. A click costs the decoder and the upscaling of its
three masks to the image's size (~50 ms for vit_b on a 2-core CPU), then ~2 to 6 ms per mask PNG.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import queue
import secrets
import threading
import time
import urllib.parse
from concurrent.futures import Future
from typing import Any, AsyncIterator, Callable, Dict, Optional, Tuple

import numpy as np

from ..amg import SamAutomaticMaskGenerator
from ..build import Params
from ..modeling import Sam
from ..predictor import SamPredictor
from . import encoding, prompts
from .errors import DemoError

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
# Uploads: 50 MB of file, 50 megapixels (8660 x 5773; a phone's 48-megapixel photo fits). Three
# full-size masks of such an image take 150 MB of booleans on the host.
MAX_BYTES = 50 * 1000 * 1000
MAX_PIXELS = 50 * 1000 * 1000
# JSON requests are a few hundred bytes; this bounds what a malformed one can make the server read.
MAX_JSON_BYTES = 1 << 20


class _Worker:
    """One daemon thread that runs the model work in submission order (a daemon, so that stopping
    the server does not wait for an embedding under way)."""

    def __init__(self) -> None:
        self._jobs: "queue.SimpleQueue[Optional[Tuple[Future, Callable[[], Any]]]]" = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[], Any]) -> Any:
        future: Future = Future()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="sam_jax demo model", daemon=True)
                self._thread.start()
        self._jobs.put((future, fn))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Ends the thread once the jobs already submitted are done (the app's shutdown)."""
        with self._lock:
            if self._thread is not None:
                self._jobs.put(None)
                self._thread = None

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            future, fn = job
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # for the request that waits on it
                    future.set_exception(e)


@dataclasses.dataclass
class _Held:
    """An image the server holds: its predictor (embedding and decoder context) and size."""

    predictor: SamPredictor
    size: Tuple[int, int]  # (H, W) as displayed


class _Demo:
    """The state behind the endpoints: the model, the held images (LRU) and the worker."""

    def __init__(self, model: Sam, params: Params, cache_size: int, max_pixels: int, max_bytes: int, name: str):
        self.model, self.params, self.name = model, params, name
        self.cache_size, self.max_pixels, self.max_bytes = cache_size, max_pixels, max_bytes
        self.images: "collections.OrderedDict[str, _Held]" = collections.OrderedDict()
        self.worker = _Worker()

    def lookup(self, image_id: str) -> _Held:
        held = self.images.get(image_id)
        if held is None:
            n = self.cache_size
            raise DemoError(
                f"this image is no longer held by the server (only the last {n} are kept): open it again"
                if n > 1
                else "this image is no longer held by the server (only the last one is kept): open it again",
                status=404,
            )
        self.images.move_to_end(image_id)
        return held

    def hold(self, held: _Held) -> str:
        image_id = secrets.token_hex(8)
        self.images[image_id] = held
        while len(self.images) > self.cache_size:
            self.images.popitem(last=False)
        return image_id

    # --- model work, on the worker thread ---

    def embed(self, data: bytes, preview: bool) -> Tuple[_Held, Optional[str]]:
        image = encoding.decode_image(data, self.max_pixels)
        predictor = SamPredictor(self.model, self.params)
        try:
            predictor.set_image(image)
        except ValueError as e:  # e.g. an image too elongated for the model's input frame
            raise DemoError(f"the model cannot take this image: {e}") from None
        return _Held(predictor, image.shape[:2]), encoding.encode_jpeg(image) if preview else None

    def predict(self, held: _Held, prompt: prompts.Prompt) -> Dict[str, Any]:
        start = time.perf_counter()
        try:
            masks, scores, _ = held.predictor.predict(
                prompt.coords,
                prompt.labels,
                prompt.box,
                multimask_output=prompt.multimask,
                hq_token_only=prompt.hq_token_only,
            )
        except (ValueError, TypeError) as e:  # the predictor's own checks, after ours
            raise DemoError(str(e)) from None
        return {
            "masks": [encoding.encode_mask(m) for m in masks],
            "scores": [float(s) for s in scores],
            "areas": [int(np.count_nonzero(m)) for m in masks],
            "best": int(np.argmax(scores)),
            "ms": round((time.perf_counter() - start) * 1000, 1),
        }

    def everything(self, held: _Held, options: Dict[str, Any]) -> Dict[str, Any]:
        start = time.perf_counter()
        try:
            generator = SamAutomaticMaskGenerator(self.model, self.params, output_mode="binary_mask", **options)
            predictor = held.predictor
            records = generator.generate_from_embedding(
                predictor.image_embeddings[0], held.size, predictor.hq_features[0]
            )
            coco = encoding.coco_records(records)
        except (ValueError, TypeError) as e:
            raise DemoError(str(e)) from None
        except ImportError as e:  # pycocotools, for the COCO RLE records
            raise DemoError(str(e), status=501) from None
        return {
            "count": len(records),
            "labels": encoding.encode_labels([r["segmentation"] for r in records], held.size),
            "records": coco,
            "seconds": round(time.perf_counter() - start, 2),
        }


def _same_origin(request: Any) -> None:
    """Refuses (403) a request that a browser sent from another site's page: the server listens on
    this machine, and any page open in its browser could otherwise make it work. Browsers name the
    page's origin in the Origin header; other clients (curl, scripts) send none."""
    origin = request.headers.get("origin")
    if origin is not None and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
        raise DemoError(f"a request from another site's page ({origin}) is refused", status=403)


async def _read_body(request: Any, limit: int, what: str) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (declared or read)."""
    declared = request.headers.get("content-length")
    too_large = DemoError(f"the {what} is larger than this server takes ({limit / 1e6:g} MB)", status=413)
    if declared is not None:
        if not declared.isdigit():
            raise DemoError(f"the Content-Length header {declared!r} is not a number")
        if int(declared) > limit:
            raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    model: Sam,
    params: Params,
    *,
    cache_size: int = 3,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    name: str = "",
):
    """The demo's Starlette app for one model (see the module docstring for its endpoints).

    Args:
      model (Sam), params (dict): e.g. from `sam_jax.load(name_or_path)`.
      cache_size (int): images whose embeddings are held (the oldest dropped), >= 1.
      max_pixels (int): the largest image taken, in pixels (checked before decoding).
      max_bytes (int): the largest upload taken, in bytes.
      name (str): the model's name as the page shows it (e.g. the --weights given).
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    if not isinstance(model, Sam):
        raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
    for arg, value in (("cache_size", cache_size), ("max_pixels", max_pixels), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    demo = _Demo(model, params, cache_size, max_pixels, max_bytes, name)

    async def page(request: Request) -> FileResponse:
        return FileResponse(os.path.join(STATIC, "index.html"))

    async def info(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "model": demo.name,
                "hq": bool(model.config.hq),
                "cache_size": demo.cache_size,
                "max_pixels": demo.max_pixels,
                "max_bytes": demo.max_bytes,
                "everything": prompts.EVERYTHING_DEFAULTS,
                "max_points_per_side": prompts.MAX_POINTS_PER_SIDE,
            }
        )

    async def upload(request: Request) -> JSONResponse:
        _same_origin(request)
        data = await _read_body(request, demo.max_bytes, "image")
        if not data:
            raise DemoError("the request body is empty: send the image file's bytes")
        preview = request.query_params.get("preview", "0")
        if preview not in ("0", "1"):
            raise DemoError(f"preview must be 0 or 1, got {preview!r}")
        start = time.perf_counter()
        held, jpeg = await demo.worker.run(lambda: demo.embed(data, preview == "1"))
        h, w = held.size
        out = {"id": demo.hold(held), "width": w, "height": h, "seconds": round(time.perf_counter() - start, 2)}
        if jpeg is not None:
            out["preview"] = jpeg
        return JSONResponse(out)

    async def predict(request: Request) -> JSONResponse:
        _same_origin(request)
        body = prompts.parse_json(await _read_body(request, MAX_JSON_BYTES, "request"))
        image_id = prompts.image_id(body, prompts.PREDICT_FIELDS)
        prompt = prompts.predict_prompt(body)  # a malformed request is told so, held image or not
        held = demo.lookup(image_id)
        prompts.check_inside(prompt, held.size)
        return JSONResponse(await demo.worker.run(lambda: demo.predict(held, prompt)))

    async def everything(request: Request) -> JSONResponse:
        _same_origin(request)
        body = prompts.parse_json(await _read_body(request, MAX_JSON_BYTES, "request"))
        image_id = prompts.image_id(body, prompts.EVERYTHING_FIELDS)
        options = prompts.everything_options(body)
        held = demo.lookup(image_id)
        return JSONResponse(await demo.worker.run(lambda: demo.everything(held, options)))

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, DemoError):
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if isinstance(exc, HTTPException):  # no such route, or a method it does not take
            return JSONResponse({"error": f"{request.method} {request.url.path}: {exc.detail}"}, exc.status_code)
        # A bug of the server's, not the request's: said as such; the server goes on.
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/image", upload, methods=["POST"]),
        Route("/api/predict", predict, methods=["POST"]),
        Route("/api/everything", everything, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        demo.worker.close()

    handlers = {DemoError: refused, HTTPException: refused, Exception: refused}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.demo = demo
    return app
