"""`SamPredictor`: the official predictor's API on jit-compiled JAX, with batched prompting.

Prompts are (x, y) pixels of the ORIGINAL image; outputs are numpy arrays at the original size,
as from the official `segment_anything.SamPredictor`. What compiles when is described in
`sam_jax.functional` (fixed shapes: new image sizes and point counts do not recompile); how
they are compiled for the backend, in `sam_jax.backend`.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from . import backend, inputs
from .build import Params
from .functional import (
    MAX_PROMPTS_PER_CALL,
    decode_prompts,
    dense_pe,
    encode_images,
    image_context,
    point_bucket,
    prepare_images,
    prompt_bucket,
    size_bucket,
)
from .modeling import PAD_LABEL, Sam, decoder_params
from .transforms import ResizeLongestSide, mask_upscale_taps, preprocess_padded, upscale_masks, upscale_width_window

Outputs = Tuple[np.ndarray, np.ndarray, np.ndarray]
# ((row_start, row_w), (col_start, col_w)): `transforms.upscale_masks`' interpolation tables.
Tables = Tuple[Tuple[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]
MASK_THRESHOLD = 0.0

# --- The pure entry points as the predictor compiles them (see `functional` for what compiles when). ---

_decode = backend.jit_tuned(decode_prompts, static_argnames=("model", "multimask_output"))
_dense_pe = jax.jit(dense_pe, static_argnames=("model",))
_image_context = jax.jit(image_context, static_argnames=("model",))
_encode_images = jax.jit(encode_images, static_argnames=("model",))
_preprocess = jax.jit(preprocess_padded)


@partial(backend.jit_tuned, static_argnames=("return_logits", "width_window"))
def _upscale(low_res: jax.Array, rows, cols, return_logits: bool, width_window: int = 0) -> jax.Array:
    logits = upscale_masks(low_res, rows, cols, width_window)
    return logits if return_logits else logits > MASK_THRESHOLD


def _encode(model: Sam, params: Params, images: np.ndarray, sizes: np.ndarray) -> Tuple[jax.Array, ...]:
    """`encode_images`, run as `backend` says this backend runs it fastest (on XLA:CPU the chain
    of `backend.encode_staged`, elsewhere one jit) -> one (1, h, w, C) embedding per image: the
    decoder then sees one shape whatever the batch was."""
    if backend.staging_pays():
        emb = backend.encode_staged(model, params, _preprocess(images, sizes))
    else:
        emb = _encode_images(model, params, images, sizes)
    return (emb,) if emb.shape[0] == 1 else tuple(emb[i : i + 1] for i in range(emb.shape[0]))


def _pad_rows(x: np.ndarray, n: int, fill: float = 0.0) -> np.ndarray:
    """Pads axis 0 of x to n rows with `fill`."""
    if x.shape[0] == n:
        return x
    return np.concatenate([x, np.full((n - x.shape[0], *x.shape[1:]), fill, x.dtype)])


@dataclasses.dataclass(frozen=True)
class _Image:
    """What `set_images` keeps of one image."""

    embedding: jax.Array  # (1, h, w, C) NHWC
    context: Dict[str, jax.Array]  # `functional.image_context` of the embedding
    original_size: Tuple[int, int]  # (H, W) as given
    input_size: Tuple[int, int]  # (h, w) resized into the model frame
    tables: Tables  # low-res logits -> the bucket-padded original size
    width_window: int  # `transforms.upscale_width_window` of the column table


class SamPredictor:
    """Computes image embeddings once, then predicts masks for any number of prompts.

    Args:
      model (Sam): the module, e.g. from `sam_jax.load(path)`.
      params (dict): its parameters.

    Official surface: `set_image`, `predict`, `get_image_embedding`, `reset_image`,
    `is_image_set`, `original_size`, `input_size`, `features`, `transform` (outputs are numpy
    arrays, not torch tensors). Additions: `set_images` (several
    images encoded in one call, then `image_index=` on every method), `predict_batch` (B prompts
    in one call), `image_embeddings` and `upscale_tables` (device arrays for `decode_prompts`).
    """

    def __init__(self, model: Sam, params: Params) -> None:
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
        self.model = model
        self.params = params
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
        # Synchronous like the official set_image: errors surface here and timings mean something.
        embeddings = jax.block_until_ready(_encode(self.model, self.params, padded, sizes))
        records = []
        for emb, (h, w), (oh, ow) in zip(embeddings, sizes.tolist(), originals):
            args = (self.low_res_size, self.image_size)
            cols = mask_upscale_taps(*args, w, ow, size_bucket(ow))
            records.append(
                _Image(
                    embedding=emb,
                    # The decoder's prompt-independent work, done once here rather than per predict
                    # (used for prompts without mask_input; see functional.image_context).
                    context=_image_context(self.model, self._decoder_params, emb, self._image_pe),
                    original_size=(oh, ow),
                    input_size=(h, w),
                    tables=(jax.device_put(mask_upscale_taps(*args, h, oh, size_bucket(oh))), jax.device_put(cols)),
                    width_window=upscale_width_window(*cols, self.low_res_size),
                )
            )
        self._images = tuple(records)

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
    ) -> Outputs:
        """Masks for one prompt, as the official `SamPredictor.predict`.

        Args:
          point_coords: (N, 2) (x, y) original-image pixels; point_labels: (N,) int, 1 foreground,
            0 background (-1: the official "not a point" token).
          box: (4,) (x0, y0, x1, y1) original-image pixels.
          mask_input: (1, 256, 256) low-res mask LOGITS, e.g. a previous call's third output[k:k+1].
          multimask_output: 3 masks (True) or 1.
          return_logits: full-size float logits instead of boolean masks (logits > 0).
          image_index: which image of `set_images`.

        Returns:
          masks (C, H, W) bool (float32 logits if return_logits), iou_predictions (C,) float32,
          low_res_logits (C, 256, 256) float32.
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
        out = self._run(
            i,
            points,
            boxes,
            masks,
            inputs.check_flag(multimask_output, "multimask_output"),
            inputs.check_flag(return_logits, "return_logits"),
        )
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
    ) -> Outputs:
        """Masks for B prompts on one image in one call (chunks of MAX_PROMPTS_PER_CALL).

        Equal to B `predict` calls. Prompt b combines whichever of its points, box and mask are given.

        Args:
          point_coords: (B, N, 2) (x, y) original-image pixels, or a list of B arrays (N_b, 2) of
            different lengths; point_labels: (B, N) or a list of B arrays (N_b,); 1 / 0 / -1, and
            PAD_LABEL for ignored slots.
          boxes: (B, 4) (x0, y0, x1, y1) original-image pixels.
          mask_input: (B, 1, 256, 256) low-res mask LOGITS (a previous call's third output[:, k:k+1]).
          multimask_output, return_logits, image_index: as in `predict`.

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
        )

    def _run(
        self,
        i: int,
        points: Optional[List[Tuple[np.ndarray, np.ndarray]]],
        boxes: Optional[np.ndarray],
        masks: Optional[np.ndarray],
        multimask: bool,
        return_logits: bool,
    ) -> Outputs:
        """Prompts already in the model-input frame -> numpy outputs at the original size."""
        b = next((len(x) for x in (points, boxes, masks) if x is not None), 1)
        image = self._images[i]
        h, w = image.original_size
        m = self.model.config.num_multimask_outputs if multimask else 1
        s = self.low_res_size
        out_masks = np.empty((b, m, h, w), np.float32 if return_logits else bool)
        out_iou = np.empty((b, m), np.float32)
        out_low = np.empty((b, m, s, s), np.float32)
        n_slots = point_bucket(max(len(lab) for _, lab in points)) if points is not None else 0
        for start in range(0, b, MAX_PROMPTS_PER_CALL):
            stop = min(start + MAX_PROMPTS_PER_CALL, b)
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
            if points is None and boxes is None and masks is None:
                n = 1  # no prompt at all: the decoder's own batch of one, as officially
            low, iou = _decode(
                self.model,
                self._decoder_params,
                image.embedding,
                coords,
                labels,
                chunk_boxes,
                chunk_masks,
                multimask_output=multimask,
                image_pe=self._image_pe,
                image_context=image.context if chunk_masks is None else None,
            )
            rows, cols = image.tables
            full = _upscale(low, rows, cols, return_logits=return_logits, width_window=image.width_window)
            k = stop - start
            out_masks[start:stop] = np.asarray(full)[:k, :, :h, :w]
            out_iou[start:stop] = np.asarray(iou)[:k]
            out_low[start:stop] = np.asarray(low)[:k]
        return out_masks, out_iou, out_low
