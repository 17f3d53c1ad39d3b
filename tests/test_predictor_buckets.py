"""The predictor's buckets and what it compiles ahead, on the tiny model: prompt counts whose cost
grows smoothly (no memory cliff), and an interactive session that never waits for a compilation
after its first `predict`."""

from __future__ import annotations

import threading

import jax
import numpy as np
import pytest
import skimage.data

import sam_jax.predictor as predictor_module
from sam_jax import SamPredictor
from sam_jax import functional as F
from sam_jax.predictor import INTERACTIVE_POINTS, _Background, _decode, _lower_in_caller_thread, _pad_prompts
from tests.compilations import COMPILE_EVENTS, count_compilations

PHOTO = np.ascontiguousarray(skimage.data.coffee()[::2, ::2])  # 200 x 300: output buckets (256, 368)
OTHER = np.ascontiguousarray(skimage.data.chelsea())  # 300 x 451: output buckets (368, 512)


def compiled_in_this_thread():
    """The functions XLA compiles in the calling thread inside the block: what a caller waits for."""
    return count_compilations(COMPILE_EVENTS[:1], this_thread_only=True)


def clicks(rng, image, with_box):
    """The prompts of an interactive session on `image`: 1 to INTERACTIVE_POINTS points, each with
    a box when with_box (and the box alone first)."""
    h, w = image.shape[:2]
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.9 * h]) if with_box else None
    if with_box:
        yield dict(box=box)
    for n in range(1, INTERACTIVE_POINTS + 1):
        yield dict(point_coords=rng.uniform(0, 1, (n, 2)) * [w, h], point_labels=rng.integers(0, 2, n), box=box)


# --- point buckets: no memory cliff ---


def test_point_buckets_x4_up_to_64_then_sqrt2():
    # Up to 64 points the buckets (and the compiled programs, and the results) are unchanged.
    assert [F.point_bucket(n) for n in (0, 1, 2, 4, 5, 16, 17, 64)] == [1, 1, 4, 4, 16, 16, 64, 64]
    counts = np.unique(np.geomspace(65, 20000, 400).astype(int))
    buckets = [F.point_bucket(n) for n in counts]
    assert all(b >= n and b % 16 == 0 for n, b in zip(counts, buckets))
    # sqrt(2) steps rounded up to 16: the padding at most ~1.5x the points, ~2.2x the memory of
    # the attention between tokens (quadratic in the slots); x4 steps padded up to ~4x and 16x.
    assert max(b / n for n, b in zip(counts, buckets)) < 1.5
    assert F.point_bucket(4096) == 4096 and F.point_bucket(4097) == 5808  # was 16384


def test_prompts_per_call_keep_prompts_times_slots_bounded():
    for slots in (0, 1, 4, 16, 64):
        assert F.prompts_per_call(slots) == F.MAX_PROMPTS_PER_CALL  # unchanged up to 64 slots
    for slots in sorted({F.point_bucket(n) for n in range(65, 20000, 37)}):
        per_call = F.prompts_per_call(slots)
        assert per_call & (per_call - 1) == 0  # a power of 2: chunks are their own prompt bucket
        assert per_call == 1 or per_call * slots <= F.MAX_SLOTS_PER_CALL
        assert 2 * per_call * slots > F.MAX_SLOTS_PER_CALL or per_call == F.MAX_PROMPTS_PER_CALL  # the largest


@pytest.mark.full  # ~8 CPU-s: two decoder compilations (nothing is allocated)
def test_just_over_the_former_cliff_costs_what_its_count_costs(tiny):
    """4097 points were padded to 16384 slots: 16 GB of XLA temporaries for one prompt on the tiny
    model, 15.6x those of 4096 points. XLA's memory analysis of the compiled decoder (compiled
    only, not run) now shows about the square of the padding, (5808 / 4096)^2 ~ 2x."""
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    temp = {}
    for n in (4096, 4097):
        points = [(np.zeros((n, 2), np.float32), np.ones(n, np.int32))]
        prompts = _pad_prompts(points, None, None, 0, 1, F.point_bucket(n))
        _, args, kwargs = p._decoding(*p._image_avals(), prompts, True, False)
        assert args[3].shape == (1, F.point_bucket(n), 2)  # the slots the decoder gets
        temp[n] = _decode.lower(*args, **kwargs).compile().memory_analysis().temp_size_in_bytes
    assert temp[4097] / temp[4096] < 2.5, temp


def test_predict_batch_runs_many_slots_in_smaller_chunks(tiny, monkeypatch):
    """A batch whose prompts x slots exceed MAX_SLOTS_PER_CALL runs in chunks of
    `prompts_per_call`, each the program `predict` runs: the same results, bit for bit."""
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    p.set_image(PHOTO)
    rng = np.random.default_rng(0)
    coords = rng.uniform(0, 1, (3, 5, 2)) * PHOTO.shape[1::-1]
    labels = rng.integers(0, 2, (3, 5))
    singles = [p.predict(xy, lab) for xy, lab in zip(coords, labels)]
    shapes = []

    def spy(*args, **kwargs):
        shapes.append(args[3].shape)
        return _decode(*args, **kwargs)

    monkeypatch.setattr(F, "MAX_SLOTS_PER_CALL", 16)  # 5 points -> 16 slots: one prompt per call
    monkeypatch.setattr(predictor_module, "_decode", spy)
    got = p.predict_batch(coords, labels)
    assert shapes == [(1, 16, 2)] * 3
    for out, want in zip(got, zip(*singles)):
        np.testing.assert_array_equal(out, np.stack(want))
    assert p._ahead == {}  # compile_ahead=False: nothing was compiled ahead


# --- compiling ahead: no stall after the first predict ---


def finish(p: SamPredictor) -> None:
    """Waits for what p compiles ahead: nothing runs on into the next test."""
    for future in p._ahead.values():
        future.exception()


@pytest.mark.full  # ~35 CPU-s standalone per case: the decoder for 7 prompt shapes, compiled ahead
@pytest.mark.parametrize("precision", ["highest", None], ids=["lowered_by_caller", "lowered_in_background"])
def test_no_compilation_after_the_first_predict(tiny, precision):
    """The session of issue 31: the first click, then 1 to 16 points without and with a box, then
    an image of another size (other output buckets) and the same clicks. After the first predict,
    nothing compiles in the caller's thread (set_image included): what is not compiled yet when a
    call needs it is being compiled in the background, and the call waits for it. Under the
    suite's thread-local matmul precision the programs are lowered in the caller's thread, under
    the global configuration in the background: either way the call finds them in jax's cache."""
    p = SamPredictor(tiny.model, tiny.params)
    assert [F.size_bucket(n) for n in PHOTO.shape[:2]] != [F.size_bucket(n) for n in OTHER.shape[:2]]
    with jax.default_matmul_precision(precision):
        assert _lower_in_caller_thread() == (precision is not None)
        p.set_image(PHOTO)
        p.predict(np.array([[50.0, 60.0]]), np.array([1]))
        rng = np.random.default_rng(0)
        with compiled_in_this_thread() as compiled:
            for i, image in enumerate((PHOTO, OTHER)):
                if i:
                    p.set_image(image)
                for with_box in (False, True):
                    for prompt in clicks(rng, image, with_box):
                        p.predict(**prompt)
    finish(p)
    assert compiled == []


@pytest.mark.full  # ~20 CPU-s standalone: the first predict with a mask_input compiles its 8 neighbours ahead
def test_mask_input_clicks_compile_once(tiny):
    """The official notebook's refinement loop: each click passes the previous best low-res mask
    with multimask_output=False. Its first call compiles (a mode not seen before), the next ones,
    with more points, do not."""
    p = SamPredictor(tiny.model, tiny.params)
    p.set_image(PHOTO)
    masks, scores, low = p.predict(np.array([[50.0, 60.0]]), np.array([1]))
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1, (INTERACTIVE_POINTS, 2)) * PHOTO.shape[1::-1]
    lab = rng.integers(0, 2, INTERACTIVE_POINTS)
    low = p.predict(xy[:1], lab[:1], mask_input=low[np.argmax(scores)][None], multimask_output=False)[2]
    with compiled_in_this_thread() as compiled:
        for n in range(2, INTERACTIVE_POINTS + 1):
            low = p.predict(xy[:n], lab[:n], mask_input=low, multimask_output=False)[2]
    finish(p)
    assert compiled == []


def test_compile_ahead_plans_every_interactive_prompt(tiny, monkeypatch):
    """What set_image submits covers, key for key, the decoder and upscaling calls of `predict`
    for 1 to INTERACTIVE_POINTS points without and with a box (official defaults). (Recorded, not
    compiled: the compilations are checked by the full-tier tests above.)"""
    submitted = []
    monkeypatch.setattr(SamPredictor, "_submit", lambda self, jitted, key, *rest: submitted.append(key))
    p = SamPredictor(tiny.model, tiny.params)
    p.set_image(PHOTO)
    image = p._images[0]
    needed = set()
    for with_box in (False, True):
        box = np.zeros((1, 4)) if with_box else None
        for n in [0] * with_box + list(range(1, INTERACTIVE_POINTS + 1)):
            points = [(np.zeros((n, 2)), np.ones(n, np.int32))] if n else None
            prompts = _pad_prompts(points, box, None, 0, 1, F.point_bucket(n) if n else 0)
            needed.add(p._decoding(image.embedding, image.context, image.hq_features, prompts, True, False)[0])
    low = jax.ShapeDtypeStruct((1, 3, p.low_res_size, p.low_res_size), np.float32)
    needed.add(predictor_module._upscaling_call(low, image.tables, image.width_window, False)[0])
    assert set(submitted) == needed and len(submitted) == len(needed) == 8  # 1, 4, 16 slots x box or not, a box alone


def test_lowering_follows_the_callers_jax_config():
    """jax's thread-local configuration (here the suite's matmul precision) is part of a compiled
    program's cache key: programs are lowered in the caller's thread under one, in the background
    under the global configuration. (`_jax_context` reads jax's private trace context: this fails
    if a jax release removes it, which would leave every lowering to the caller.)"""
    assert predictor_module._jax_context() is not None
    assert _lower_in_caller_thread()  # the autouse fixture's jax.default_matmul_precision("highest")
    with jax.default_matmul_precision(None):
        assert not _lower_in_caller_thread()


# --- the background thread ---


def test_background_runs_in_order_waited_for_first_and_cancels_the_queue_on_close():
    bg, order = _Background(), []
    started, release = threading.Event(), threading.Event()

    def blocker():
        started.set()
        assert release.wait(5)

    first = bg.submit(blocker)
    queued = {name: bg.submit(lambda name=name: order.append(name)) for name in "abc"}
    assert started.wait(5)
    bg.move_to_front(queued["c"])  # someone waits for c
    release.set()
    queued["b"].result(timeout=5)
    assert order == ["c", "a", "b"] and first.done() and not first.cancelled()
    started.clear(), release.clear()
    running = bg.submit(blocker)
    later = bg.submit(lambda: order.append("later"))
    assert started.wait(5)
    threading.Timer(0.05, release.set).start()
    bg.close()  # as at interpreter exit: the running one finishes, the queue is dropped
    assert running.done() and not running.cancelled() and later.cancelled()
    assert bg.submit(lambda: None).cancelled() and order == ["c", "a", "b"]
