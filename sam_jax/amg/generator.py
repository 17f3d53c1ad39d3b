"""`SamAutomaticMaskGenerator`: the official automatic mask generator on jit-compiled JAX.

Same arguments, same records and the same numerics as `segment_anything.SamAutomaticMaskGenerator`
(see /work/shared/PORTING.md, "Automatic mask generator numerics"); the heavy path runs on the
device with fixed shapes (`pipeline`), and only the finally kept masks come back to the host.
Several images given to `generate_batch` are spread over the available devices.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import numpy as np

from .. import inputs
from ..build import Params
from ..modeling import Sam
from . import geometry
from . import masks as M
from . import pipeline as pl
from .checks import OUTPUT_MODES, check_generator_args  # noqa: F401  (re-exported)
from .runner import CropResult, Job, Runner, fetch_masks

Record = Dict[str, Any]


class SamAutomaticMaskGenerator:
    """Generates masks for a whole image from a grid of point prompts, then filters and dedups.

    Args:
      model (Sam): the module, e.g. from `sam_jax.load(path)`; params (dict): its parameters.
      points_per_side (int or None): points sampled along one side (points_per_side ** 2 in all);
        None when `point_grids` gives the points.
      points_per_batch (int): points decoded together (more is faster and uses more memory).
      pred_iou_thresh (float): keep masks whose predicted IoU is > this (no filter when <= 0).
      stability_score_thresh (float): keep masks whose stability score is >= this (no filter
        when <= 0); stability_score_offset (float): the logit shift of that score.
      box_nms_thresh (float): box IoU above which NMS drops the lower-IoU mask inside a crop.
      crop_n_layers (int): extra crop layers; layer i has (2 ** i) ** 2 crops.
      crop_nms_thresh (float): box IoU for the NMS between crops (smaller crops win).
      crop_overlap_ratio (float): overlap of layer-1 crops as a fraction of the short side.
      crop_n_points_downscale_factor (int): layer i uses points_per_side / factor ** i points.
      point_grids (list of (N, 2) arrays in [0, 1]): one explicit grid per layer.
      min_mask_region_area (int): if > 0, fill holes and drop islands smaller than this many
        pixels (8-connected; needs scipy), then NMS again.
      output_mode (str): "binary_mask" (bool (H, W)), "uncompressed_rle" or "coco_rle" (needs
        pycocotools).
      hq_token_only (bool): SAM-HQ only: every mask is the HQ mask alone instead of SAM's best +
        the HQ mask (SAM-HQ's own generator always adds them; its predictor's option).
      devices (list of jax.Device): where to run; default all local devices.

    `generate(image)` returns one record per mask: segmentation, area, bbox (XYWH), predicted_iou,
    point_coords ([[x, y]]), stability_score, crop_box (XYWH), as the official generator.
    """

    def __init__(
        self,
        model: Sam,
        params: Params,
        points_per_side: Optional[int] = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        crop_nms_thresh: float = 0.7,
        crop_overlap_ratio: float = 512 / 1500,
        crop_n_points_downscale_factor: int = 1,
        point_grids: Optional[List[np.ndarray]] = None,
        min_mask_region_area: int = 0,
        output_mode: str = "binary_mask",
        devices: Optional[Sequence[jax.Device]] = None,
        hq_token_only: bool = False,
    ) -> None:
        if not isinstance(model, Sam):
            raise TypeError(f"model must be a sam_jax.Sam, got {type(model).__name__}")
        hq_token_only = inputs.check_flag(hq_token_only, "hq_token_only")
        if hq_token_only and not model.config.hq:
            raise ValueError("hq_token_only=True needs a SAM-HQ model (config.hq); this model is SAM")
        a = check_generator_args(
            points_per_side=points_per_side,
            points_per_batch=points_per_batch,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            stability_score_offset=stability_score_offset,
            box_nms_thresh=box_nms_thresh,
            crop_n_layers=crop_n_layers,
            crop_nms_thresh=crop_nms_thresh,
            crop_overlap_ratio=crop_overlap_ratio,
            crop_n_points_downscale_factor=crop_n_points_downscale_factor,
            point_grids=point_grids,
            min_mask_region_area=min_mask_region_area,
            output_mode=output_mode,
        )
        self.__dict__.update(a)
        if points_per_side is not None:
            self.point_grids = geometry.build_all_layer_point_grids(
                self.points_per_side, self.crop_n_layers, self.crop_n_points_downscale_factor
            )
        if self.output_mode == "coco_rle":
            try:
                import pycocotools.mask  # noqa: F401
            except ImportError:
                raise ImportError("output_mode='coco_rle' needs pycocotools: pip install 'sam-jax[amg]'") from None
        if self.min_mask_region_area > 0:
            try:
                import scipy.ndimage  # noqa: F401
            except ImportError:
                raise ImportError("min_mask_region_area > 0 needs scipy: pip install 'sam-jax[amg]'") from None
        if devices is None:
            devices = jax.local_devices()
        devices = list(devices)
        if not devices or not all(isinstance(d, jax.Device) for d in devices):
            raise TypeError("devices must be a non-empty list of jax.Device")
        self.model, self.params, self.devices, self.hq_token_only = model, params, devices, hq_token_only
        self.runner = Runner(
            model,
            params,
            devices,
            self.points_per_batch,
            (self.pred_iou_thresh, self.stability_score_thresh, self.stability_score_offset),
            self.box_nms_thresh,
            hq_token_only=hq_token_only,
        )

    # --- public API ---

    def generate(self, image: Any) -> List[Record]:
        """Masks for one image: HWC uint8 (0..255) or float (0..1) RGB; grayscale is replicated
        and an alpha channel dropped (`sam_jax.inputs.as_rgb_uint8`). Returns a list of records."""
        return self.generate_batch([image])[0]

    def generate_batch(self, images: Sequence[Any]) -> List[List[Record]]:
        """Masks for several images; their crops are spread over the devices (one per device per
        step). Returns one list of records per image, equal to `generate` on each."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        if not isinstance(images, (list, tuple)) or not images:
            raise TypeError("images must be a non-empty list of images")
        rgb = [
            inputs.as_rgb_uint8(im, name=f"images[{i}]" if len(images) > 1 else "image") for i, im in enumerate(images)
        ]
        jobs = self._jobs([im.shape[:2] for im in rgb])
        results = self.runner.run(jobs, rgb)
        return [self._records(i, im.shape[:2], [r for r in results if r.job.image == i]) for i, im in enumerate(rgb)]

    def generate_from_embedding(
        self, image_embedding: Any, original_size: Tuple[int, int], hq_features: Any = None
    ) -> List[Record]:
        """Masks from an embedding you already have (crop_n_layers must be 0): (1, e, e, C) NHWC
        as `SamPredictor.image_embeddings[i]`, or the official (1, C, e, e) NCHW layout as
        `get_image_embedding()`; `original_size` is the image's (H, W). A SAM-HQ model also needs
        the image's HQ features, (1, 4e, 4e, C/8) as `SamPredictor.hq_features[i]`."""
        if self.crop_n_layers != 0:
            raise ValueError("generate_from_embedding needs crop_n_layers=0: crops need their own embeddings")
        cfg = self.model.config
        if cfg.hq and hq_features is None:
            raise ValueError(
                "generate_from_embedding: a SAM-HQ model also needs the image's hq_features "
                "(SamPredictor.hq_features[i]), or use generate(image)"
            )
        if not cfg.hq and hq_features is not None:
            raise ValueError("hq_features: only a SAM-HQ model takes them; this model is SAM")
        size = _check_size(original_size)
        emb = _check_embedding(image_embedding, cfg.embedding_size, cfg.prompt_embed_dim)
        if cfg.hq:
            side, width = 4 * cfg.embedding_size, cfg.prompt_embed_dim // 8
            hqf = np.asarray(hq_features)
            if hqf.shape != (1, side, side, width):
                raise ValueError(f"hq_features must be (1, {side}, {side}, {width}), got {hqf.shape}")
            emb = (emb, hqf.astype(np.float32))
        jobs = self._jobs([size])
        results = self.runner.run(jobs, [np.zeros((*size, 0), np.uint8)], embeddings=[emb])
        return self._records(0, size, results)

    # --- internals ---

    def _jobs(self, sizes: Sequence[Tuple[int, int]]) -> List[Job]:
        jobs = []
        for i, (h, w) in enumerate(sizes):
            boxes, layers = geometry.generate_crop_boxes((h, w), self.crop_n_layers, self.crop_overlap_ratio)
            for box, layer in zip(boxes, layers):
                ch, cw = box[3] - box[1], box[2] - box[0]
                if ch < 1 or cw < 1:  # crops of tiny images can be empty (the official code fails there)
                    continue
                jobs.append(Job(i, box, layer, self.point_grids[layer] * np.array([[cw, ch]], np.float64)))
        return jobs

    def _records(self, index: int, size: Tuple[int, int], results: List[CropResult]) -> List[Record]:
        """Cross-crop NMS, final masks (streamed from the device, encoded as they arrive), the
        optional clean-up and the records of one image, in the official order."""
        order = [(k, i) for k, r in enumerate(results) for i in range(len(r))]
        if len(results) > 1 and order:
            boxes = np.concatenate([_absolute(r.box, r.job.crop_box) for r in results])
            areas = [np.float32((x1 - x0) * (y1 - y0)) for x0, y0, x1, y1 in (r.job.crop_box for r in results)]
            scores = np.concatenate([np.full(len(r), np.float32(1.0) / a, np.float32) for r, a in zip(results, areas)])
            keep = _nms_host(boxes, scores, self.crop_nms_thresh)
            order = [order[i] for i in keep]
        h, w = size
        # Per final mask: (segmentation, area, box XYXY, clean-up score).
        entries: List[Tuple[Any, int, np.ndarray, float]] = [None] * len(order)  # type: ignore[list-item]
        for k, r in enumerate(results):
            pos = [p for p, (kk, _) in enumerate(order) if kk == k]
            if not pos:
                continue
            x0, y0, x1, y1 = r.job.crop_box
            chunks = fetch_masks(r, np.array([order[p][1] for p in pos]))
            for p, crop_mask in zip(pos, (m for chunk in chunks for m in chunk)):
                mask = np.zeros((h, w), bool)
                mask[y0:y1, x0:x1] = crop_mask
                box = _absolute(r.box[order[p][1]][None], r.job.crop_box)[0]
                score = 1.0
                if self.min_mask_region_area > 0:
                    mask, changed = self._clean(mask)
                    if changed:  # the official recomputes boxes; unchanged masks keep theirs
                        box, score = geometry.masks_to_boxes(mask[None])[0], 0.0
                entries[p] = (self._encode(mask), int(np.count_nonzero(mask)), box, score)
        if self.min_mask_region_area > 0 and order:
            # The official clean-up's NMS: unchanged masks (score 1) win over changed ones (0).
            keep = _nms_host(
                np.stack([e[2] for e in entries]),
                np.asarray([e[3] for e in entries], np.float32),
                max(self.box_nms_thresh, self.crop_nms_thresh),
            )
            order, entries = [order[i] for i in keep], [entries[i] for i in keep]
        records = []
        for (k, i), (seg, area, box, _) in zip(order, entries):
            r = results[k]
            point = r.job.points[r.point[i]] + np.array(r.job.crop_box[:2], np.float64)
            records.append(
                {
                    "segmentation": seg,
                    "area": area,
                    "bbox": geometry.box_xyxy_to_xywh(box),
                    "predicted_iou": float(r.iou[i]),
                    "point_coords": [point.tolist()],
                    "stability_score": float(r.stab[i]),
                    "crop_box": geometry.box_xyxy_to_xywh(r.job.crop_box),
                }
            )
        return records

    def _clean(self, mask: np.ndarray) -> Tuple[np.ndarray, bool]:
        """Official `postprocess_small_regions` on one mask: fill small holes, drop small islands."""
        mask, changed_holes = M.remove_small_regions(mask, self.min_mask_region_area, "holes")
        mask, changed_islands = M.remove_small_regions(mask, self.min_mask_region_area, "islands")
        return mask, changed_holes or changed_islands

    def _encode(self, mask: np.ndarray) -> Any:
        if self.output_mode == "binary_mask":
            return mask
        rle = M.mask_to_rle(mask)
        return M.coco_encode_rle(rle) if self.output_mode == "coco_rle" else rle


def _absolute(boxes: np.ndarray, crop_box: Sequence[int]) -> np.ndarray:
    x0, y0 = crop_box[:2]
    return boxes + np.array([x0, y0, x0, y0], np.int64)


def _nms_host(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Device NMS on host-sized inputs, padded to a power of two (few compilations)."""
    n = len(scores)
    size = 1 << max(n - 1, 0).bit_length()
    b = np.zeros((size, 4), np.float32)
    s = np.zeros(size, np.float32)
    v = np.zeros(size, bool)
    b[:n], s[:n], v[:n] = boxes, scores, True
    kept, n_kept = pl.nms_single(b, s, v, np.float32(threshold))
    return np.asarray(kept)[: int(n_kept)]


def _check_size(size: Any) -> Tuple[int, int]:
    try:
        h, w = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok or h < 1 or w < 1:
        raise ValueError(f"original_size must be (H, W) positive ints, got {size!r}")
    return h, w


def _check_embedding(x: Any, side: int, channels: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape == (1, side, side, channels):
        return arr.astype(np.float32)
    if arr.shape == (1, channels, side, side):
        return arr.transpose(0, 2, 3, 1).astype(np.float32)
    raise ValueError(
        f"image_embedding must be (1, {side}, {side}, {channels}) NHWC or (1, {channels}, {side}, "
        f"{side}) NCHW, got {arr.shape}"
    )
