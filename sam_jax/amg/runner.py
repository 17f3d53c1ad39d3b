"""Host orchestration of the per-crop device stages (`pipeline`) for groups of crop jobs.

A group holds one job per device (the last group of a layer is padded with copies of its first
job, whose results are dropped). The host prepares small arrays (points, interpolation tables,
crop geometry), dispatches the stages asynchronously, grows the survivor buffers when an upper
bound on their fill says they could overflow, and fetches only the stats of the masks kept by
the per-crop NMS. Full-resolution masks are fetched later, for the finally kept masks only
(`fetch_masks`).
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh

from .. import backend
from ..build import Params
from ..functional import prepare_images
from ..modeling import Sam
from ..transforms import get_preprocess_shape, mask_upscale_taps
from . import pipeline as pl

# Full-resolution pixels upsampled at once by the filter stage (32 MB of float32 logits): the
# chunk size K is this over the crop's padded pixel count.
CHUNK_PIXELS = 1 << 23
# Padded crop sides are multiples of this (one filter compilation per padded size).
SIZE_MULTIPLE = 64
# Masks re-upsampled and fetched per call at the end.
FINAL_CHUNK = 16
# Points whose masks are upscaled at once by the decoder (about 12 MB of activations each).
DECODE_CHUNK = 16
# First survivor-buffer capacity, in decoded batches (grown x2 as needed).
INITIAL_CAPACITY_BATCHES = 2


@dataclasses.dataclass
class Job:
    """One crop of one image: `points` (N, 2) float64 (x, y) pixels of the CROP."""

    image: int
    crop_box: List[int]  # [x0, y0, x1, y1] in the image, x1 / y1 exclusive
    layer: int
    points: np.ndarray

    @property
    def crop_hw(self) -> Tuple[int, int]:
        x0, y0, x1, y1 = self.crop_box
        return y1 - y0, x1 - x0


@dataclasses.dataclass
class CropResult:
    """What a job leaves after its NMS, in NMS order: stats on the host, logits on the device."""

    job: Job
    iou: np.ndarray  # (n,) float32
    stab: np.ndarray  # (n,) float32
    box: np.ndarray  # (n, 4) int64, inclusive, CROP frame
    area: np.ndarray  # (n,) int64
    point: np.ndarray  # (n,) int64 index into job.points
    slots: np.ndarray  # (n,) rows of `low`
    low: jax.Array  # (1, k, L, L) on one device, k >= n: the kept masks' low-res logits
    tables: Tuple[Tuple[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]

    def __len__(self) -> int:
        return len(self.iou)


def padded_side(n: int) -> int:
    return -(-n // SIZE_MULTIPLE) * SIZE_MULTIPLE


def model_frame_coords(points: np.ndarray, crop_hw: Tuple[int, int], image_size: int) -> np.ndarray:
    """Crop pixels (N, 2) float64 -> model-frame float32 as the official pipeline sees them.

    The official code scales in float64 and its prompt encoder adds 0.5 and divides by the input
    size in float64 before casting to float32. Ours adds 0.5 in float32, so we pass
    f32(c + 0.5) - 0.5 (exact in float32): adding 0.5 gives back f32(c + 0.5), and for a
    power-of-two input size the division is exact, so the encoder sees the official values.
    """
    h, w = crop_hw
    new_h, new_w = get_preprocess_shape(h, w, image_size)
    c = np.array(points, np.float64)
    c[:, 0] *= new_w / w
    c[:, 1] *= new_h / h
    return (c + 0.5).astype(np.float32) - np.float32(0.5)


class Runner:
    """Runs groups of jobs on `devices` (one job per device per group)."""

    def __init__(
        self,
        model: Sam,
        params: Params,
        devices: Sequence[jax.Device],
        points_per_batch: int,
        thresholds: Tuple[float, float, float],
        box_nms_thresh: float,
        hq_token_only: bool = False,
    ) -> None:
        self.model, self.devices = model, list(devices)
        self.hq_token_only = hq_token_only  # SAM-HQ: the HQ masks alone
        self.points_per_batch = points_per_batch
        self.image_size = model.config.image_size
        self.low_size = model.config.mask_input_size
        self.thresholds = np.asarray(thresholds, np.float32)
        self.box_nms_thresh = np.float32(box_nms_thresh)
        self._params = {}
        self._host_params = params

    def mesh(self, n: int) -> Mesh:
        return Mesh(np.array(self.devices[:n]), (pl.AXIS,))

    def params(self, mesh: Mesh) -> Params:
        if mesh not in self._params:
            self._params[mesh] = pl.replicate(self._host_params, mesh)
        return self._params[mesh]

    def group_size(self, n_jobs: int) -> int:
        """Jobs per group: one per device; a lone job runs on one device."""
        return 1 if n_jobs == 1 else len(self.devices)

    def run(
        self, jobs: Sequence[Job], images: Sequence[np.ndarray], embeddings: Optional[Sequence[jax.Array]] = None
    ) -> List[CropResult]:
        """All jobs (any layers), in groups of equal point count; results in job order.
        `embeddings` (one (1, e, e, C) per job; SAM-HQ: (it, HQ features)) skips the encoder."""
        results: List[Optional[CropResult]] = [None] * len(jobs)
        by_size = {}
        for i, job in enumerate(jobs):
            by_size.setdefault((job.layer, len(job.points)), []).append(i)
        for idxs in by_size.values():
            g = self.group_size(len(idxs))
            for start in range(0, len(idxs), g):
                chunk = idxs[start : start + g]
                embs = None if embeddings is None else [embeddings[i] for i in chunk]
                out = self.run_group([jobs[i] for i in chunk], images, g, embs)
                for i, r in zip(chunk, out):
                    results[i] = r
        return results  # type: ignore[return-value]

    def run_group(
        self, jobs: List[Job], images: Sequence[np.ndarray], size: int, embeddings: Optional[List[jax.Array]] = None
    ) -> List[CropResult]:
        """`jobs` (at most `size`, padded to it) on the first `size` devices."""
        n_real = len(jobs)
        jobs = jobs + [jobs[0]] * (size - n_real)
        mesh = self.mesh(size)
        params = self.params(mesh)
        model, s, b = self.model, self.image_size, self.points_per_batch
        hws = [j.crop_hw for j in jobs]
        if embeddings is None:
            crops = [images[j.image][y0:y1, x0:x1] for j in jobs for x0, y0, x1, y1 in [j.crop_box]]
            padded, sizes, _ = prepare_images(crops, s)
            tuned = backend.encoder_runs_tuned(model.config)
            encode = pl.sharded(("encode", model), partial(pl.encode_job, model), mesh, 1, tuned=tuned)
            emb = encode(params, pl.put(padded, mesh), pl.put(sizes, mesh))
        else:
            # One embedding per job (SAM-HQ: (embedding, HQ features), as `encode_job` gives).
            stacked = lambda *xs: pl.put(np.stack([np.asarray(x) for x in xs]), mesh)  # noqa: E731
            emb = jax.tree_util.tree_map(stacked, *(embeddings + embeddings[:1] * (size - n_real)))

        hp, wp = max(padded_side(h) for h, _ in hws), max(padded_side(w) for _, w in hws)
        rows, cols = [], []
        for h, w in hws:
            ih, iw = get_preprocess_shape(h, w, s)
            rows.append(mask_upscale_taps(self.low_size, s, ih, h, hp))
            cols.append(mask_upscale_taps(self.low_size, s, iw, w, wp))
        stack = lambda tabs: tuple(np.stack([t[k] for t in tabs]) for k in range(2))  # noqa: E731
        rows_d, cols_d = pl.put(stack(rows), mesh), pl.put(stack(cols), mesh)
        geo = [
            pl.put(np.asarray(x, np.int32), mesh)
            for x in (hws, [j.crop_box for j in jobs], [images[j.image].shape[:2] for j in jobs])
        ]

        n_points = len(jobs[0].points)
        n_batches = -(-n_points // b)
        coords = np.zeros((size, n_batches * b, 2), np.float32)
        valid = np.zeros((size, n_batches * b), bool)
        for i, j in enumerate(jobs):
            coords[i, :n_points] = model_frame_coords(j.points, j.crop_hw, s)
            valid[i, :n_points] = True
        k = pl.masks_per_point(model)
        m = k * b
        chunk = max(1, min(m, CHUNK_PIXELS // (hp * wp)))
        dchunk = min(b, DECODE_CHUNK)
        # The decoder's small dots run better on XLA's own fusions (see backend.CPU_XLA_OPTIONS).
        decode = pl.sharded(
            ("decode", model, dchunk, self.hq_token_only),
            partial(pl.decode_job, model, chunk=dchunk, hq_token_only=self.hq_token_only),
            mesh,
            2,
            tuned=True,
        )
        filt = pl.sharded(("filter", chunk), partial(pl.filter_job, chunk=chunk), mesh, 1, tuned=True)
        append = pl.sharded(("append",), pl.append_job, mesh, 0, donate=(0,))
        thresholds = pl.replicate(self.thresholds, mesh)

        cap = min(k * n_batches * b, INITIAL_CAPACITY_BATCHES * m)
        bufs = pl.put(
            jax.tree_util.tree_map(lambda x: np.stack([x] * size), pl.empty_buffers(cap, self.low_size)), mesh
        )
        bound = 0  # upper bound on every job's buffer count
        for bi in range(n_batches):
            sl = slice(bi * b, (bi + 1) * b)
            low, iou = decode(thresholds, params, emb, pl.put(coords[:, sl], mesh), pl.put(valid[:, sl], mesh))
            base = pl.put(np.full(size, k * bi * b, np.int32), mesh)
            out = filt(
                thresholds, low, iou, pl.put(np.repeat(valid[:, sl], k, axis=1), mesh), base, rows_d, cols_d, *geo
            )
            if bound + m > cap:
                bound = int(np.max(np.asarray(bufs["count"])))
                if bound + m > cap:
                    cap = min(k * n_batches * b, 1 << math.ceil(math.log2(bound + m)))
                    grow = pl.sharded(("grow", cap), partial(pl.grow_job, cap=cap), mesh, 0)
                    bufs = grow(bufs)
            bufs = append(bufs, low, out)
            bound += m

        nms = pl.sharded(("nms",), pl.nms_job, mesh, 1)
        kept, n_kept = nms(pl.replicate(self.box_nms_thresh, mesh), bufs)
        kept, n_kept = np.asarray(kept), np.asarray(n_kept)
        host = {k: np.asarray(bufs[k]) for k in pl.BUFFER_KEYS}
        # Keep only the NMS survivors' logits (a power-of-two bucket); the buffer is freed.
        kcap = 1 << max(int(n_kept.max()) - 1, 0).bit_length()
        gather = pl.sharded(("gather",), lambda low, idx: low[idx], mesh, 0)
        low_kept = gather(bufs["low"], pl.put(np.ascontiguousarray(kept[:, :kcap]), mesh))
        del bufs
        shards = {sh.index[0].start or 0: sh.data for sh in low_kept.addressable_shards}
        results = []
        for i in range(n_real):
            slots = kept[i, : n_kept[i]]
            results.append(
                CropResult(
                    job=jobs[i],
                    iou=host["iou"][i, slots],
                    stab=host["stab"][i, slots],
                    box=host["box"][i, slots].astype(np.int64),
                    area=host["area"][i, slots].astype(np.int64),
                    point=host["src"][i, slots].astype(np.int64) // k,
                    slots=np.arange(len(slots), dtype=np.int32),
                    low=shards[i],
                    tables=(rows[i], cols[i]),
                )
            )
        return results


def fetch_masks(result: CropResult, order: np.ndarray) -> Iterator[np.ndarray]:
    """The masks of `result` at positions `order` (K,), re-upsampled on the result's device
    FINAL_CHUNK at a time: yields bool (k, h, w) chunks in the crop frame, in `order`."""
    h, w = result.job.crop_hw
    device = next(iter(result.low.devices()))
    tables = jax.device_put(result.tables, device)
    crop_hw = jax.device_put(np.asarray([h, w], np.int32), device)
    wp = result.tables[1][0].shape[0]
    slots = result.slots[order]
    for start in range(0, len(slots), FINAL_CHUNK):
        idx = np.zeros(FINAL_CHUNK, np.int32)
        part = slots[start : start + FINAL_CHUNK]
        idx[: len(part)] = part
        packed = pl.final_masks(result.low, jax.device_put(idx, device), *tables, crop_hw)
        bits = np.unpackbits(np.asarray(packed), axis=-1, count=wp).astype(bool)
        yield bits[: len(part), :h, :w]
