"""Batched prompting, several images per call, the on-device JAX path and compilation discipline,
on the tiny model (cheap: every claim here is about shapes and padding, not model size)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

import sam_jax
from sam_jax import PAD_LABEL, SamPredictor, backend, decode_prompts
from sam_jax import functional as F
from sam_jax.transforms import upscale_masks
from tests.compilations import COMPILE_EVENTS, count_compilations

PHOTO = np.ascontiguousarray(skimage.data.coffee()[::2, ::2])  # 200 x 300
H, W = PHOTO.shape[:2]


@pytest.fixture(scope="module")
def pred(tiny) -> SamPredictor:
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    p.set_image(PHOTO)
    return p


def random_boxes(rng, n, h=H, w=W):
    xy = rng.uniform(0, 1, (n, 2, 2)) * [w, h]
    return np.concatenate([xy.min(1), xy.max(1)], axis=1)


def assert_close(got, want, conf_logits=None):
    """Batched vs single calls run different compiled shapes: float noise only."""
    masks, iou, low = got
    w_masks, w_iou, w_low = want
    # 1e-5 x std: rounding noise of a different batch shape, far below any real difference (~1).
    assert np.max(np.abs(low - w_low)) <= 1e-5 * np.std(w_low)
    np.testing.assert_allclose(iou, w_iou, rtol=0, atol=1e-5)  # IoU scores are O(1)
    if masks.dtype != bool:  # full-size logits: same noise bound as the low-res ones
        assert np.max(np.abs(masks - w_masks)) <= 1e-5 * np.std(w_masks)
    if conf_logits is not None:  # masks equal wherever the logit is not within noise of 0
        conf = np.abs(conf_logits) > 1e-3
        assert np.array_equal(masks[conf] > 0, w_masks[conf] > 0)


@pytest.mark.full  # ~8 CPU-s; batching is checked in the daily tier by the tests below
def test_64_boxes_equal_64_single_calls(pred):
    boxes = random_boxes(np.random.default_rng(0), 64)
    got = pred.predict_batch(boxes=boxes)
    assert got[0].shape == (64, 3, H, W) and got[1].shape == (64, 3) and got[2].shape[:2] == (64, 3)
    singles = [pred.predict(box=b) for b in boxes]
    logits = np.stack([pred.predict(box=b, return_logits=True)[0] for b in boxes])
    assert_close(got, [np.stack(x) for x in zip(*singles)], logits)


@pytest.mark.full  # ~10 CPU-s: a second chunk size compiled
def test_more_prompts_than_one_chunk(pred):
    n = F.MAX_PROMPTS_PER_CALL + 6  # two chunks, the second padded to 8
    boxes = random_boxes(np.random.default_rng(1), n)
    got = pred.predict_batch(boxes=boxes, multimask_output=False, return_logits=True)
    want = [
        np.stack(x) for x in zip(*(pred.predict(box=b, multimask_output=False, return_logits=True) for b in boxes[-8:]))
    ]
    assert_close(tuple(x[-8:] for x in got), want, want[0])


@pytest.mark.full  # ~17 CPU-s: every prompt shape compiled
def test_ragged_points_boxes_and_masks_equal_single_calls(pred):
    rng = np.random.default_rng(2)
    counts = [1, 5, 17, 2]  # 17 points: the 64-slot bucket for the whole batch
    coords = [rng.uniform(0, 1, (n, 2)) * [W, H] for n in counts]
    labels = [rng.integers(0, 2, n) for n in counts]
    boxes = random_boxes(rng, len(counts))
    prev = pred.predict_batch(coords, labels)[2]  # low-res logits as the next mask prompts
    masks = prev[:, :1]
    got = pred.predict_batch(coords, labels, boxes, masks, return_logits=True)
    want = [
        np.stack(x)
        for x in zip(
            *(pred.predict(c, lab, b, m, return_logits=True) for c, lab, b, m in zip(coords, labels, boxes, masks))
        )
    ]
    assert_close(got, want, want[0])


def test_pad_label_slots_equal_unpadded(tiny):
    """Padding with PAD_LABEL leaves the answer unchanged; padding with the official -1 token
    ("not a point") would change it: that is why buckets pad with PAD_LABEL."""
    rng = np.random.default_rng(3)
    emb = jnp.asarray(rng.normal(size=(1, 10, 10, 48)), jnp.float32)
    coords = jnp.asarray(rng.uniform(0, 160, (2, 3, 2)), jnp.float32)
    labels = jnp.asarray([[1, 0, 1], [0, 1, 1]], jnp.int32)
    decode = jax.jit(lambda *a: decode_prompts(tiny.model, tiny.params, emb, *a))
    want = decode(coords, labels)
    pad_c = jnp.concatenate([coords, jnp.full((2, 13, 2), 37.0)], axis=1)
    for fill, same in ((PAD_LABEL, True), (-1, False)):
        pad_l = jnp.concatenate([labels, jnp.full((2, 13), fill, jnp.int32)], axis=1)
        got = decode(pad_c, pad_l)
        err = float(jnp.max(jnp.abs(got[0] - want[0])) / jnp.std(want[0]))
        # Masked softmax columns are exactly 0: only summation-order noise remains (~1e-7).
        assert (err <= 1e-5) == same, (fill, err)


def test_decode_prompts_inside_user_jit(pred, tiny):
    """The JAX path: embedding, prompts, decoder and upscaling all on device in one user jit."""
    pts = np.array([[120.0, 80.0], [30.0, 150.0]])
    lab = np.array([1, 0])
    masks, iou, low = pred.predict(pts, lab, return_logits=True)
    rows, cols = pred.upscale_tables()

    @jax.jit
    def segment(params, emb, coords, labels, context=None):
        lo, sc = decode_prompts(tiny.model, params, emb, coords, labels, image_context=context)
        return lo, sc, upscale_masks(lo, rows, cols)

    coords = pred.transform.apply_coords(pts, pred.original_size)[None]
    # Plain, and with the predictor's precomputed per-image decoder work.
    for context in (None, pred.image_contexts[0]):
        lo, sc, full = segment(tiny.params, pred.image_embeddings[0], coords, lab[None], context)
        assert isinstance(full, jax.Array)
        assert_close((np.asarray(full)[0, :, :H, :W], np.asarray(sc)[0], np.asarray(lo)[0]), (masks, iou, low))


def test_set_images_equals_one_by_one(tiny):
    rng = np.random.default_rng(4)
    photos = [PHOTO, np.ascontiguousarray(skimage.data.astronaut()[::4, ::5]), PHOTO[:90, :40]]
    many = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    many.set_images(photos)
    one = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    assert many.num_images == 3 and many.original_sizes == [p.shape[:2] for p in photos]
    for i, photo in enumerate(photos):
        one.set_image(photo)
        assert many.input_sizes[i] == one.input_size
        e1, e3 = one.get_image_embedding(), many.get_image_embedding(i)
        assert np.max(np.abs(e3 - e1)) <= 1e-5 * np.std(e1)  # batch of 3 vs 1: rounding noise
        box = random_boxes(rng, 1, *photo.shape[:2])[0]
        assert_close(
            many.predict(box=box, image_index=i), one.predict(box=box), one.predict(box=box, return_logits=True)[0]
        )


def test_no_recompilation(tiny):
    """After warm-up (one call per point bucket: 1, 2..4 and 5..16 points), 1..16 points and an
    image of another size compile nothing (the buckets alone, nothing compiled ahead)."""
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    first, second = PHOTO, np.ascontiguousarray(skimage.data.chelsea()[:250, :330])
    # Different sizes and aspect ratios, same output buckets (sides up to 256 and 368).
    assert first.shape[:2] != second.shape[:2]
    assert [F.size_bucket(n) for n in first.shape[:2]] == [F.size_bucket(n) for n in second.shape[:2]]
    p.set_image(first)
    p.predict([[10, 10]], [1])
    p.predict([[10, 10]] * 4, [1] * 4)
    p.predict([[10, 10]] * 16, [1] * 16)
    rng = np.random.default_rng(5)
    with count_compilations() as events:
        for image in (first, second):
            p.set_image(image)
            h, w = image.shape[:2]
            for n in range(1, 17):
                p.predict(rng.uniform(0, 1, (n, 2)) * [w, h], rng.integers(0, 2, n))
    assert events == []


def test_new_size_bucket_compiles_only_the_upscaling(tiny):
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    p.set_image(PHOTO)
    p.predict([[10, 10]], [1])
    big = np.ascontiguousarray(np.tile(PHOTO, (3, 1, 1)))  # 600 x 300: a new height bucket
    compiled = []  # the name of each function XLA compiles (jax reports it with the event)

    def listener(name, duration, fun_name="", **kwargs):
        if name == COMPILE_EVENTS[0]:
            compiled.append(fun_name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with count_compilations() as events:
            p.set_image(big)
            p.predict([[10, 10]], [1])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert not any("decode_prompts" in name for name in compiled), compiled  # the decoder is reused
    assert events.count(COMPILE_EVENTS[0]) <= 1  # at most the upscaling, once


def test_encoder_compiles_once_per_batch_size(tiny):
    p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    p.set_images([PHOTO, PHOTO[:50]])
    with count_compilations() as events:
        p.set_images([PHOTO[:, :70], np.ascontiguousarray(skimage.data.astronaut()[::3, ::3])])
    assert events == []


def test_buckets():
    assert [F.point_bucket(n) for n in (0, 1, 4, 5, 16, 17, 64, 65, 300)] == [1, 1, 4, 16, 16, 64, 64, 96, 368]
    assert [F.prompt_bucket(n) for n in (1, 2, 3, 33, 64)] == [1, 2, 4, 64, 64]
    sides = list(range(1, 5000, 7))
    buckets = [F.size_bucket(n) for n in sides]
    assert all(b >= n and b % 16 == 0 for n, b in zip(sides, buckets))
    assert all(b <= max(256, 1.42 * n + 16) for n, b in zip(sides, buckets))  # sqrt(2) steps
    assert len(set(buckets)) <= 12  # few compilations across all sizes up to 5000


def test_decoder_compiles_with_its_xla_options(pred, tiny):
    # The predictor's decoder and upscaling jits carry CPU_XLA_OPTIONS when this XLA knows
    # them: no YNNPACK library fusion is left in the decoder's compiled program.
    from sam_jax.predictor import _decode  # the predictor's own jitted decoder

    opts = backend.cpu_compiler_options()
    if opts is None:
        pytest.skip("this XLA does not know the decoder's options (it then uses its defaults)")
    assert opts == backend.CPU_XLA_OPTIONS
    xy = np.array([[[20.0, 30.0]]], np.float32)
    args = (pred.model, tiny.params, pred.image_embeddings[0], xy, np.ones((1, 1), np.int32), None, None)
    kw = dict(multimask_output=True, image_pe=F.dense_pe(tiny.model, tiny.params))
    default = jax.jit(F.decode_prompts, static_argnames=("model", "multimask_output"))
    if "__ynn_fusion" not in default.lower(*args, **kw).compile().as_text():
        pytest.skip("this XLA makes no YNNPACK fusions by default: the options have nothing to turn off")
    assert "__ynn_fusion" not in _decode.lower(*args, **kw).compile().as_text()
    # The same logits as under XLA's defaults, up to float rounding.
    got, want = _decode(*args, **kw)[0], default(*args, **kw)[0]
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.std(want))  # fusion order: rounding only


def test_unknown_xla_options_fall_back_to_defaults(monkeypatch):
    # An XLA without the option (older or newer jaxlib) must not break decoding: no options then.
    monkeypatch.setattr(backend, "CPU_XLA_OPTIONS", {"xla_sam_jax_no_such_option": ""})
    backend.cpu_compiler_options.cache_clear()
    try:
        assert backend.cpu_compiler_options() is None
        assert not backend.staging_pays()
        jitted = backend.jit_tuned(lambda x: x * 2)
        assert float(jitted(jnp.float32(3.0))) == 6.0
    finally:
        backend.cpu_compiler_options.cache_clear()


def test_options_check_raises_other_xla_errors(monkeypatch):
    # Only "no such option" means "this XLA lacks it"; any other compile error is a real one.
    if backend.cpu_compiler_options() is None:
        pytest.skip("this XLA does not know the option: no bad value of it to give")
    monkeypatch.setattr(backend, "CPU_XLA_OPTIONS", {"xla_cpu_experimental_ynn_fusion_type": "no-such-fusion"})
    backend.cpu_compiler_options.cache_clear()
    try:
        with pytest.raises(jax.errors.JaxRuntimeError) as info:
            backend.cpu_compiler_options()
        assert "No such compile option" not in str(info.value)
    finally:
        backend.cpu_compiler_options.cache_clear()


def test_encoder_stages():
    # vit_b: each global block's attention half alone, the rest grouped between them.
    stages = backend.encoder_stages(sam_jax.get_config("vit_b"))
    assert stages == (
        (0, 4, False),
        (4, 5, True),
        (5, 10, False),
        (10, 11, True),
        (11, 16, False),
        (16, 17, True),
        (17, 22, False),
        (22, 23, True),
        (23, 24, False),
    )
    for name in ("tiny", "vit_l", "vit_h"):
        cfg = sam_jax.get_config(name)
        stages = backend.encoder_stages(cfg)
        assert stages[0][0] == 0 and stages[-1][1] == 2 * cfg.encoder_depth
        assert all(a[1] == b[0] for a, b in zip(stages, stages[1:]))  # contiguous, in order
        assert [s[0] // 2 for s in stages if s[2]] == sorted(cfg.encoder_global_attn_indexes)


def _encode_one_jit(model, params, x):
    return jax.jit(lambda p, x: model.apply({"params": p}, x, method=sam_jax.Sam.encode_image))(params, x)


def test_staged_encoder_equals_one_jit(tiny):
    rng = np.random.default_rng(0)
    s = tiny.model.config.image_size
    x = jnp.asarray(rng.normal(size=(2, s, s, 3)), jnp.float32)
    want = _encode_one_jit(tiny.model, tiny.params, x)
    got = backend.encode_staged(tiny.model, tiny.params, x)
    assert got.shape == want.shape == (2, 10, 10, 48) and got.dtype == jnp.float32
    # Different executables (and fusion options) per stage: float rounding only.
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-5 * float(jnp.std(want))
    if backend.staging_pays():
        # The windowed stages carry the options: no YNNPACK fusion left where XLA makes them.
        from sam_jax.backend import _encoder_stage, _stage_tuned  # the stage encode_staged runs

        start, stop, xla_defaults = backend.encoder_stages(tiny.model.config)[0]
        assert not xla_defaults
        args, kw = (tiny.model, tiny.params, x), dict(start=start, stop=stop)
        default = jax.jit(_encoder_stage, static_argnames=("model", "start", "stop"))
        if "__ynn_fusion" in default.lower(*args, **kw).compile().as_text():
            assert "__ynn_fusion" not in _stage_tuned.lower(*args, **kw).compile().as_text()


def test_encoder_layers_are_checked(tiny):
    m, p = tiny.model, {"params": tiny.params}
    tokens = jnp.zeros((1, 10, 10, 48), jnp.float32)
    for bad in [(0, 0), (3, 2), (-1, 2), (0, 7)]:
        with pytest.raises(ValueError, match=r"layers must be \(start, stop\) with 0 <= start < stop <= 6"):
            m.apply(p, tokens, *bad, method="encode_image_layers")
    with pytest.raises(ValueError, match=r"tokens between encoder stages must have shape \(B, 10, 10, 48\)"):
        m.apply(p, jnp.zeros((1, 10, 10, 40)), 2, 4, method="encode_image_layers")
    with pytest.raises(ValueError, match=r"images must have shape \(B, 160, 160, 3\)"):
        m.apply(p, tokens, 0, 2, method="encode_image_layers")


def test_predictor_encodes_with_one_jit_without_the_options(tiny, monkeypatch):
    # Where the options are unknown (or off the CPU) the predictor runs `encode_images` as one jit.
    monkeypatch.setattr(backend, "CPU_XLA_OPTIONS", {"xla_sam_jax_no_such_option": ""})
    backend.cpu_compiler_options.cache_clear()
    try:
        p = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
        p.set_image(PHOTO)
        padded, sizes, _ = F.prepare_images([PHOTO], tiny.model.config.image_size)
        want = jax.jit(F.encode_images, static_argnames=("model",))(tiny.model, tiny.params, padded, sizes)
        assert np.array_equal(np.asarray(p.image_embeddings[0]), np.asarray(want))
    finally:
        backend.cpu_compiler_options.cache_clear()
