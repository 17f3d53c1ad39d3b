"""`SamPredictor`: the official predictor's API on jit-compiled JAX, with batched prompting.

Prompts are (x, y) pixels of the ORIGINAL image; outputs are numpy arrays at the original size,
as from the official `segment_anything.SamPredictor`. What compiles when is described in
`sam_jax.functional` (fixed shapes: new image sizes and point counts do not recompile); how
they are compiled for the backend, in `sam_jax.backend`; what `SamPredictor` compiles ahead, so
that an interactive session does not stall between clicks, in `SamPredictor`.
"""

from __future__ import annotations

import atexit
import collections
import dataclasses
import threading
from concurrent.futures import Future
from functools import partial
from typing import Any, Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from . import backend, inputs
from .build import Params
from .functional import (
    decode_prompts,
    dense_pe,
    encode_images,
    encode_images_hq,
    image_context,
    point_bucket,
    prepare_images,
    prompt_bucket,
    prompts_per_call,
    size_bucket,
)
from .modeling import PAD_LABEL, Sam, decoder_params
from .quantize import quantization_of
from .transforms import ResizeLongestSide, mask_upscale_taps, preprocess_padded, upscale_masks, upscale_width_window

Outputs = Tuple[np.ndarray, np.ndarray, np.ndarray]
# ((row_start, row_w), (col_start, col_w)): `transforms.upscale_masks`' interpolation tables.
Tables = Tuple[Tuple[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]
MASK_THRESHOLD = 0.0

# --- The pure entry points as the predictor compiles them (see `functional` for what compiles when). ---

_decode = backend.jit_tuned(decode_prompts, static_argnames=("model", "multimask_output", "hq_token_only"))
_dense_pe = jax.jit(dense_pe, static_argnames=("model",))
_image_context = jax.jit(image_context, static_argnames=("model",))
_encode_images = jax.jit(encode_images, static_argnames=("model",))
_encode_images_tuned = backend.jit_tuned(encode_images, static_argnames=("model",))
_encode_images_hq = jax.jit(encode_images_hq, static_argnames=("model",))
_preprocess = jax.jit(preprocess_padded)


@partial(backend.jit_tuned, static_argnames=("return_logits", "width_window"))
def _upscale(low_res: jax.Array, rows, cols, return_logits: bool, width_window: int = 0) -> jax.Array:
    logits = upscale_masks(low_res, rows, cols, width_window)
    return logits if return_logits else logits > MASK_THRESHOLD


def _encode(model: Sam, params: Params, images: np.ndarray, sizes: np.ndarray) -> Tuple[Tuple[jax.Array, ...], ...]:
    """`encode_images`, run as `backend` says this backend runs it fastest (on XLA:CPU the chain
    of `backend.encode_staged` for SAM's ViT, `backend.encoder_runs_tuned` for MobileSAM's
    TinyViT; elsewhere one jit) -> one (1, h, w, C) embedding per image: the decoder then sees
    one shape whatever the batch was. Returns (embeddings, hq_features): SAM-HQ's per-image HQ
    features (`encode_images_hq`), (1, 4h, 4w, C/8) each, or Nones for other models."""
    hq = None
    if model.config.hq:
        emb, hq = _encode_images_hq(model, params, images, sizes)
    elif backend.staging_pays(model.config, int8_activations=_int8_activations(model)):
        emb = backend.encode_staged(model, params, _preprocess(images, sizes))
    else:
        encode = _encode_images_tuned if backend.encoder_runs_tuned(model.config) else _encode_images
        emb = encode(model, params, images, sizes)
    n = emb.shape[0]
    return tuple(emb[i : i + 1] for i in range(n)), tuple(None if hq is None else hq[i : i + 1] for i in range(n))


def _int8_activations(model: Sam) -> bool:
    """Whether `model` is a "w8a8" model of `sam_jax.quantize` (int8 x int8 matmuls)."""
    quantization = quantization_of(model)
    return quantization is not None and quantization.get("mode") == "w8a8"


def _pad_rows(x: np.ndarray, n: int, fill: float = 0.0) -> np.ndarray:
    """Pads axis 0 of x to n rows with `fill`."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.full((n - x.shape[0], *x.shape[1:]), fill, x.dtype)])


# --- Compiling ahead (see `SamPredictor`'s compile_ahead) ---

# Point counts of an interactive session, one click after another: the buckets of 1 to this many
# points are compiled ahead, with and without a box.
INTERACTIVE_POINTS = 16
# (mask_input given, multimask_output, return_logits, hq_token_only) of `predict`: the official
# defaults are what is compiled ahead before the first predict.
Mode = Tuple[bool, bool, bool, bool]
DEFAULT_MODE: Mode = (False, True, False, False)


class _Background:
    """One daemon thread that runs the compilations submitted from any thread, in order. At
    interpreter exit the queued ones are cancelled and the running one finishes, so exit waits
    for at most one compilation."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: Deque[Tuple[Future, Callable[[], None]]] = collections.deque()
        self._thread: Optional[threading.Thread] = None
        self._closed = False

    def submit(self, fn: Callable[[], None]) -> Future:
        future: Future = Future()
        with self._cond:
            if self._closed:
                future.cancel()
                return future
            self._queue.append((future, fn))
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="sam_jax compile ahead", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._cond.notify()
        return future

    def move_to_front(self, future: Future) -> None:
        """Runs a queued future next (someone waits for it)."""
        with self._cond:
            for i, item in enumerate(self._queue):
                if item[0] is future:
                    del self._queue[i]
                    self._queue.appendleft(item)
                    return

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                future, fn = self._queue.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # for whoever waits on it
                    future.set_exception(e)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            for future, _ in self._queue:
                future.cancel()
            self._queue.clear()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()


_BACKGROUND = _Background()


def _jax_context() -> Any:
    """jax's configuration as this thread sees it, as far as jit's cache keys on it (thread-local
    settings such as `with jax.default_matmul_precision(...)` included), or None where this jax
    does not tell (it is not public API)."""
    try:
        from jax._src.config import trace_context
    except ImportError:
        return None
    return trace_context()


def _lower_in_caller_thread() -> bool:
    """Whether programs compiled ahead must be lowered in the calling thread: where its jax
    configuration differs from the one a new thread sees (a thread-local setting), or is not
    known. A program lowered under another configuration would compile into another entry of
    jax's cache, of no use to the call."""
    context, fresh = _jax_context(), []
    if context is None:
        return True
    probe = threading.Thread(target=lambda: fresh.append(_jax_context()))
    probe.start()
    probe.join()
    return fresh != [context]


@dataclasses.dataclass(frozen=True)
class _Image:
    """What `set_images` keeps of one image."""

    embedding: jax.Array  # (1, h, w, C) NHWC
    context: Dict[str, jax.Array]  # `functional.image_context` of the embedding
    hq_features: Optional[jax.Array]  # SAM-HQ's (1, 4h, 4w, C/8) (`functional.encode_images_hq`), or None
    original_size: Tuple[int, int]  # (H, W) as given
    input_size: Tuple[int, int]  # (h, w) resized into the model frame
    tables: Tables  # low-res logits -> the bucket-padded original size
    width_window: int  # `transforms.upscale_width_window` of the column table


class SamPredictor:
    """Computes image embeddings once, then predicts masks for any number of prompts.

    Args:
      model (Sam): the module, e.g. from `sam_jax.load(path)`.
      params (dict): its parameters.
      compile_ahead (bool): compile on a background thread, from `set_image` on, what the
        next `predict` calls of an interactive session need: the decoder for 1 to
        INTERACTIVE_POINTS points, with and without a box (7 programs, once per process), and
        the mask upscaling of each new image size. This is done for the official defaults from
        `set_image` on, and for any other (mask_input given, multimask_output, return_logits)
        from its first `predict` on. After that first call no `predict` of 1 to 16 points, with
        or without a box, on an image of any size, compiles; a call whose program is still
        compiling waits for it (its own moves to the front of the queue). Where the encoder runs
        on an accelerator the programs compile while it encodes, on host cores it leaves free; on
        XLA:CPU they compile once the encoder is done (`backend.compile_beside_encoder`: beside
        it, vit_b's first set_image took 12 s -> 22 s on a 2-core CPU), so the first `predict`
        still compiles its own program (~2 s for vit_b) and the others follow within seconds
        (each new prompt shape 2 s -> 0.05 s once they are done). False compiles each program at
        its first call, for scripts that predict once (exit waits for at most the one
        compilation under way).

    Official surface: `set_image`, `predict`, `get_image_embedding`, `reset_image`,
    `is_image_set`, `original_size`, `input_size`, `features`, `transform` (outputs are numpy
    arrays, not torch tensors). Additions: `set_images` (several
    images encoded in one call, then `image_index=` on every method), `predict_batch` (B prompts
    in one call), `image_embeddings` and `upscale_tables` (device arrays for `decode_prompts`).
    """

    def __init__(self, model: Sam, params: Params, compile_ahead: bool = True) -> None:
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
        self.model = model
        self.params = params
        self.compile_ahead = inputs.check_flag(compile_ahead, "compile_ahead")
        self._modes: Dict[Mode, None] = {DEFAULT_MODE: None}  # an ordered set
        self._ahead: Dict[Hashable, Future] = {}  # programs submitted to _BACKGROUND, by compile key
        self._avals: Optional[Tuple[Any, ...]] = None
        self.image_size = model.config.image_size
        self.low_res_size = model.config.mask_input_size
        self.transform = ResizeLongestSide(self.image_size)
        if "image_encoder" not in params:
            raise ValueError("params has no image_encoder subtree: expected a full SAM parameter tree")
        # Decoding reads only these (ValueError naming a missing part): passing them alone halves
        # a jitted decode's cost of flattening the parameter tree. (Decoding and upscaling stay two
        # jitted calls: a new image-size bucket then recompiles only the cheap upscaling.)
        self._decoder_params = decoder_params(params)
        self._image_pe = _dense_pe(model, params)
        self.reset_image()

    # --- images ---

    def reset_image(self) -> None:
        """Forgets the current image(s)."""
        self._images: Tuple[_Image, ...] = ()

    def set_image(self, image: Any, image_format: str = "RGB") -> None:
        """Encodes one image: HWC uint8 (0..255) or float (0..1), RGB or BGR; grayscale is
        replicated to RGB and an alpha channel dropped (see `sam_jax.inputs.as_rgb_uint8`)."""
        self.set_images([image], image_format)

    def set_images(self, images: Sequence[Any], image_format: str = "RGB") -> None:
        """Encodes several images in one compiled call (one compilation per number of images).
        Prompt image i with `image_index=i`; sizes may differ. Replaces any previous image."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)):
            raise TypeError(
                f"images must be a list of images, got {type(images).__name__}; use set_image for a single image"
            )
        if not images:
            raise ValueError("images is empty: give at least one image")
        padded, sizes, originals = prepare_images(images, self.image_size, image_format)
        self.reset_image()
        upscaling = [self._upscaling(size, original) for size, original in zip(sizes.tolist(), originals)]
        beside = backend.compile_beside_encoder()  # while the encoder runs, or once it is done
        if self.compile_ahead and beside:
            self._compile_ahead(upscaling)
        # Synchronous like the official set_image: errors surface here and timings mean something.
        embeddings, hq_features = jax.block_until_ready(_encode(self.model, self.params, padded, sizes))
        if self.compile_ahead and not beside:
            self._compile_ahead(upscaling)
        records = []
        for emb, hq, (h, w), (oh, ow), (tables, width_window) in zip(
            embeddings, hq_features, sizes.tolist(), originals, upscaling
        ):
            records.append(
                _Image(
                    embedding=emb,
                    hq_features=hq,
                    # The decoder's prompt-independent work, done once here rather than per predict
                    # (used for prompts without mask_input; see functional.image_context).
                    context=_image_context(self.model, self._decoder_params, emb, self._image_pe),
                    original_size=(oh, ow),
                    input_size=(h, w),
                    tables=tables,
                    width_window=width_window,
                )
            )
        self._images = tuple(records)

    def _compile_ahead(
        self, upscaling: Sequence[Tuple[Tables, int]], modes: Sequence[Mode] = (), box_first: bool = False
    ) -> None:
        """Queues the programs the next clicks need in MODES (default: every mode seen so far) for
        images of these (tables, width window) (see the class docstring)."""
        lower_here = _lower_in_caller_thread()
        for mode in modes or list(self._modes):
            self._decoders_ahead(mode, lower_here, box_first)
            self._upscaling_ahead(mode, upscaling, lower_here)

    def _upscaling(self, input_size: Sequence[int], original_size: Sequence[int]) -> Tuple[Tables, int]:
        """An image's mask upscaling: its tables (device arrays) and their static width window."""
        (h, w), (oh, ow) = input_size, original_size
        args = (self.low_res_size, self.image_size)
        rows = mask_upscale_taps(*args, h, oh, size_bucket(oh))
        cols = mask_upscale_taps(*args, w, ow, size_bucket(ow))
        return (jax.device_put(rows), jax.device_put(cols)), upscale_width_window(*cols, self.low_res_size)

    @property
    def is_image_set(self) -> bool:
        return bool(self._images)

    @property
    def num_images(self) -> int:
        return len(self._images)

    @property
    def original_size(self) -> Optional[Tuple[int, int]]:
        """(H, W) of image 0 as given, or None."""
        return self._images[0].original_size if self._images else None

    @property
    def input_size(self) -> Optional[Tuple[int, int]]:
        """(h, w) of image 0 after resizing its longest side to the model input size, or None."""
        return self._images[0].input_size if self._images else None

    @property
    def original_sizes(self) -> List[Tuple[int, int]]:
        return [r.original_size for r in self._images]

    @property
    def input_sizes(self) -> List[Tuple[int, int]]:
        return [r.input_size for r in self._images]

    @property
    def features(self) -> Optional[np.ndarray]:
        """The official attribute: image 0's embedding, numpy (1, C, h, w) NCHW, or None."""
        return self.get_image_embedding(0) if self.is_image_set else None

    @property
    def image_embeddings(self) -> Tuple[jax.Array, ...]:
        """One (1, h, w, C) NHWC device array per image, for `decode_prompts`."""
        return tuple(r.embedding for r in self._images)

    @property
    def hq_features(self) -> Tuple[Optional[jax.Array], ...]:
        """SAM-HQ: one (1, 4h, 4w, C/8) NHWC device array of HQ features per image, for
        `decode_prompts(..., hq_features=predictor.hq_features[i])`; Nones for other models."""
        return tuple(r.hq_features for r in self._images)

    @property
    def image_contexts(self) -> Tuple[Dict[str, jax.Array], ...]:
        """One `functional.image_context` per image (the decoder's prompt-independent work), for
        `decode_prompts(..., image_context=predictor.image_contexts[i])` without a mask_input."""
        return tuple(r.context for r in self._images)

    def _index(self, image_index: Any) -> int:
        if not self.is_image_set:
            raise RuntimeError("An image must be set with .set_image(...) before mask prediction.")
        if isinstance(image_index, bool) or not isinstance(image_index, (int, np.integer)):
            raise TypeError(f"image_index must be an int, got {type(image_index).__name__}")
        if not 0 <= image_index < self.num_images:
            raise ValueError(f"image_index must be in [0, {self.num_images}), got {image_index}")
        return int(image_index)

    def get_image_embedding(self, image_index: int = 0) -> np.ndarray:
        """The embedding of an image as numpy (1, C, h, w) NCHW, the official layout."""
        i = self._index(image_index)
        return np.asarray(self._images[i].embedding).transpose(0, 3, 1, 2)

    def upscale_tables(self, image_index: int = 0) -> Tables:
        """Device arrays ((row_start, row_w), (col_start, col_w)) for `transforms.upscale_masks`,
        which maps an image's low-res logits to its bucket-padded original size."""
        return self._images[self._index(image_index)].tables

    # --- prompts ---

    def predict(
        self,
        point_coords: Optional[Any] = None,
        point_labels: Optional[Any] = None,
        box: Optional[Any] = None,
        mask_input: Optional[Any] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
        hq_token_only: bool = False,
    ) -> Outputs:
        """Masks for one prompt, as the official `SamPredictor.predict` (SAM-HQ's for a SAM-HQ model).

        Args:
          point_coords: (N, 2) (x, y) original-image pixels; point_labels: (N,) int, 1 foreground,
            0 background (-1: the official "not a point" token).
          box: (4,) (x0, y0, x1, y1) original-image pixels.
          mask_input: (1, 256, 256) low-res mask LOGITS, e.g. a previous call's third output[k:k+1].
          multimask_output: 3 masks (True) or 1.
          return_logits: full-size float logits instead of boolean masks (logits > 0).
          image_index: which image of `set_images`.
          hq_token_only: SAM-HQ only: the HQ mask alone instead of SAM's + HQ's (SAM-HQ's own
            predictor's argument; its default False there too).

        Returns:
          masks (C, H, W) bool (float32 logits if return_logits), iou_predictions (C,) float32,
          low_res_logits (C, 256, 256) float32. C is 3 with multimask_output, else 1; SAM-HQ
          returns one mask either way (with multimask_output, SAM's part is its best of three).
        """
        i = self._index(image_index)
        size = self._images[i].original_size
        points = None
        if point_coords is not None or point_labels is not None:
            xy, lab = inputs.check_points(point_coords, point_labels, size)
            points = [(self.transform.apply_coords(xy, size), lab)]
        boxes = None
        if box is not None:
            boxes = self.transform.apply_boxes(inputs.check_box(box, size), size)[None]
        masks = None
        if mask_input is not None:
            masks = inputs.check_mask_input(mask_input, (1, self.low_res_size, self.low_res_size))
        mode = (
            masks is not None,
            inputs.check_flag(multimask_output, "multimask_output"),
            inputs.check_flag(return_logits, "return_logits"),
            self._check_hq_token_only(hq_token_only),
        )
        out = self._run(i, points, boxes, masks, *mode[1:])
        if self.compile_ahead and mode not in self._modes:  # this call's neighbours, for the next clicks
            self._modes[mode] = None
            self._compile_ahead([(r.tables, r.width_window) for r in self._images], [mode], box_first=box is not None)
        return out[0][0], out[1][0], out[2][0]

    def predict_batch(
        self,
        point_coords: Optional[Any] = None,
        point_labels: Optional[Any] = None,
        boxes: Optional[Any] = None,
        mask_input: Optional[Any] = None,
        multimask_output: bool = True,
        return_logits: bool = False,
        image_index: int = 0,
        hq_token_only: bool = False,
    ) -> Outputs:
        """Masks for B prompts on one image in one call (chunks of `functional.prompts_per_call`:
        64 prompts of up to 64 points, fewer of more).

        Equal to B `predict` calls. Prompt b combines whichever of its points, box and mask are given.

        Args:
          point_coords: (B, N, 2) (x, y) original-image pixels, or a list of B arrays (N_b, 2) of
            different lengths; point_labels: (B, N) or a list of B arrays (N_b,); 1 / 0 / -1, and
            PAD_LABEL for ignored slots.
          boxes: (B, 4) (x0, y0, x1, y1) original-image pixels.
          mask_input: (B, 1, 256, 256) low-res mask LOGITS (a previous call's third output[:, k:k+1]).
          multimask_output, return_logits, image_index, hq_token_only: as in `predict`.

        Returns:
          masks (B, C, H, W) bool (float32 logits if return_logits), iou_predictions (B, C),
          low_res_logits (B, C, 256, 256).
        """
        i = self._index(image_index)
        size = self._images[i].original_size
        counts = {}
        points = None
        if point_coords is not None or point_labels is not None:
            points = [
                (self.transform.apply_coords(xy, size), lab)
                for xy, lab in inputs.check_batch_points(point_coords, point_labels, size)
            ]
            counts["point_coords"] = len(points)
        box_arr = None
        if boxes is not None:
            box_arr = self.transform.apply_boxes(inputs.check_boxes(boxes, size), size)
            counts["boxes"] = len(box_arr)
        masks = None
        if mask_input is not None:
            s = self.low_res_size
            masks = inputs.check_mask_input(mask_input, (None, 1, s, s))[:, 0]
            counts["mask_input"] = len(masks)
        if not counts:
            raise ValueError("predict_batch needs at least one of point_coords, boxes or mask_input")
        if len(set(counts.values())) > 1:
            raise ValueError(f"prompt counts differ: {counts}; every given prompt kind needs B entries")
        return self._run(
            i,
            points,
            box_arr,
            masks,
            inputs.check_flag(multimask_output, "multimask_output"),
            inputs.check_flag(return_logits, "return_logits"),
            self._check_hq_token_only(hq_token_only),
        )

    def _check_hq_token_only(self, hq_token_only: Any) -> bool:
        flag = inputs.check_flag(hq_token_only, "hq_token_only")
        if flag and not self.model.config.hq:
            raise ValueError("hq_token_only=True needs a SAM-HQ model (config.hq); this model is SAM")
        return flag

    def _masks_per_prompt(self, multimask: bool) -> int:
        """Masks a decode returns per prompt: 3 (num_multimask_outputs) or 1; SAM-HQ always 1."""
        return self.model.config.num_multimask_outputs if multimask and not self.model.config.hq else 1

    def _run(
        self,
        i: int,
        points: Optional[List[Tuple[np.ndarray, np.ndarray]]],
        boxes: Optional[np.ndarray],
        masks: Optional[np.ndarray],
        multimask: bool,
        return_logits: bool,
        hq_token_only: bool = False,
    ) -> Outputs:
        """Prompts already in the model-input frame -> numpy outputs at the original size."""
        b = next((len(x) for x in (points, boxes, masks) if x is not None), 1)
        image = self._images[i]
        h, w = image.original_size
        m = self._masks_per_prompt(multimask)
        s = self.low_res_size
        out_masks = np.empty((b, m, h, w), np.float32 if return_logits else bool)
        out_iou = np.empty((b, m), np.float32)
        out_low = np.empty((b, m, s, s), np.float32)
        n_slots = point_bucket(max(len(lab) for _, lab in points)) if points is not None else 0
        per_call = prompts_per_call(n_slots)
        for start in range(0, b, per_call):
            stop = min(start + per_call, b)
            prompts = _pad_prompts(points, boxes, masks, start, stop, n_slots)
            key, args, kwargs = self._decoding(
                image.embedding, image.context, image.hq_features, prompts, multimask, hq_token_only
            )
            self._wait(key)
            low, iou = _decode(*args, **kwargs)
            key, args, kwargs = _upscaling_call(low, image.tables, image.width_window, return_logits)
            self._wait(key)
            full = _upscale(*args, **kwargs)
            k = stop - start
            out_masks[start:stop] = np.asarray(full)[:k, :, :h, :w]
            out_iou[start:stop] = np.asarray(iou)[:k]
            out_low[start:stop] = np.asarray(low)[:k]
        return out_masks, out_iou, out_low

    def _decoding(
        self,
        embedding: Any,
        context: Any,
        hq_features: Any,
        prompts: Tuple[Optional[np.ndarray], ...],
        multimask: bool,
        hq_token_only: bool,
    ) -> Tuple[Hashable, tuple, dict]:
        """The compile key, arguments and keyword arguments of a `_decode` call on prompts
        (`_pad_prompts`): the call and its compilation ahead share them."""
        coords, labels, boxes, masks = prompts
        key = ("decode", *(None if x is None else x.shape for x in prompts), multimask, hq_token_only)
        args = (self.model, self._decoder_params, embedding, coords, labels, boxes, masks)
        kwargs = dict(
            multimask_output=multimask,
            image_pe=self._image_pe,
            image_context=context if masks is None else None,
            hq_features=hq_features,
            hq_token_only=hq_token_only,
        )
        return key, args, kwargs

    # --- compiling ahead ---

    def _decoders_ahead(self, mode: Mode, lower_here: bool, box_first: bool = False) -> None:
        """Submits to the background thread the decoder programs `predict` in this mode needs
        next: each point bucket of 0 to INTERACTIVE_POINTS points, without and with a box (or the
        other way round). Each once per predictor; one compiled already is found in jax's cache."""
        with_mask, multimask, _, hq_token_only = mode
        s = self.low_res_size
        masks = np.zeros((1, s, s), np.float32) if with_mask else None
        for box in (box_first, not box_first):
            boxes = np.zeros((1, 4), np.float32) if box else None
            for n_slots in sorted({0} | {point_bucket(n) for n in range(1, INTERACTIVE_POINTS + 1)}):
                if n_slots == 0 and boxes is None and masks is None:
                    continue  # no prompt at all: not an interactive call
                points = [(np.zeros((n_slots, 2), np.float32), np.zeros(n_slots, np.int32))] if n_slots else None
                prompts = _pad_prompts(points, boxes, masks, 0, 1, n_slots)
                self._submit(
                    _decode, *self._decoding(*self._image_avals(), prompts, multimask, hq_token_only), lower_here
                )

    def _upscaling_ahead(self, mode: Mode, upscaling: Sequence[Tuple[Tables, int]], lower_here: bool) -> None:
        """Submits to the background thread the mask upscaling `predict` in this mode needs for
        images of these (tables, width window) (one program per output size bucket)."""
        _, multimask, return_logits, _ = mode
        m = self._masks_per_prompt(multimask)
        low = jax.ShapeDtypeStruct((1, m, self.low_res_size, self.low_res_size), jnp.float32)
        for tables, width_window in upscaling:
            self._submit(_upscale, *_upscaling_call(low, tables, width_window, return_logits), lower_here)

    def _image_avals(self) -> Tuple[Any, ...]:
        """The shapes of an image's embedding, `image_context` and HQ features (SAM-HQ; else
        None): what the decoder compiles for, known before any image is encoded."""
        if self._avals is None:
            c = self.model.config
            emb = jax.ShapeDtypeStruct((1, c.embedding_size, c.embedding_size, c.prompt_embed_dim), jnp.float32)
            ctx = jax.eval_shape(partial(image_context, self.model), self._decoder_params, emb, self._image_pe)
            side, width = c.mask_input_size, c.prompt_embed_dim // 8
            hq = jax.ShapeDtypeStruct((1, side, side, width), jnp.float32) if c.hq else None
            self._avals = (emb, ctx, hq)
        return self._avals

    def _submit(self, jitted: Any, key: Hashable, args: tuple, kwargs: dict, lower_here: bool) -> None:
        """Compiles `jitted(*args, **kwargs)` on the background thread, unless submitted before;
        compiled, it is in jax's cache, where the call finds it. Traced and lowered there too,
        unless lower_here (see `_lower_in_caller_thread`): then here, which costs the caller
        ~10% of the compilation (0.4 - 1 s per decoder program on a loaded 2-core CPU), but the
        lowered program carries the caller's thread-local configuration."""
        if key in self._ahead:
            return
        if lower_here:
            lowered = jitted.lower(*args, **kwargs)

            def compile_() -> None:
                lowered.compile()

        else:
            lower, context = jitted.lower, _jax_context()  # `jit_tuned` builds its jit here, once

            def compile_() -> None:
                if _jax_context() == context:  # else jax's global configuration changed since
                    lower(*args, **kwargs).compile()

        self._ahead[key] = _BACKGROUND.submit(compile_)

    def _wait(self, key: Hashable) -> None:
        """Waits for the program of `key` if it is being compiled ahead (moved to the front)."""
        future = self._ahead.get(key)
        if future is None or future.done():
            return
        _BACKGROUND.move_to_front(future)
        try:
            future.result()
        except Exception:  # cancelled at exit, or failed: then the call compiles, and raises, itself
            pass


def _pad_prompts(
    points: Optional[List[Tuple[np.ndarray, np.ndarray]]],
    boxes: Optional[np.ndarray],
    masks: Optional[np.ndarray],
    start: int,
    stop: int,
    n_slots: int,
) -> Tuple[Optional[np.ndarray], ...]:
    """Prompts start:stop padded to the prompt bucket (and points to n_slots slots of PAD_LABEL):
    (coords (n, n_slots, 2), labels (n, n_slots), boxes (n, 4), masks (n, L, L)), None where absent."""
    n = prompt_bucket(stop - start)
    coords = labels = chunk_boxes = chunk_masks = None
    if points is not None:
        coords = np.zeros((n, n_slots, 2), np.float32)
        labels = np.full((n, n_slots), PAD_LABEL, np.int32)
        for j, (xy, lab) in enumerate(points[start:stop]):
            coords[j, : len(lab)] = xy
            labels[j, : len(lab)] = lab
    if boxes is not None:
        chunk_boxes = _pad_rows(boxes[start:stop].astype(np.float32), n)
    if masks is not None:
        chunk_masks = _pad_rows(masks[start:stop], n)
    return coords, labels, chunk_boxes, chunk_masks


def _upscaling_call(low: Any, tables: Tables, width_window: int, return_logits: bool) -> Tuple[Hashable, tuple, dict]:
    """The compile key, arguments and keyword arguments of an `_upscale` call on low-res logits
    `low` (an array or its shape): the call and its compilation ahead share them."""
    rows, cols = tables
    key = ("upscale", low.shape, rows[0].shape, cols[0].shape, return_logits, width_window)
    return key, (low, rows, cols), dict(return_logits=return_logits, width_window=width_window)
