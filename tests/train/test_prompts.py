"""Prompt simulation: where points and boxes land, their labels, determinism, the episode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax import PAD_LABEL
from sam_jax.train import (
    PromptConfig,
    interactive_loss,
    mask_boxes,
    noisy_boxes,
    point_schedule,
    sample_corrective_points,
    sample_foreground_points,
)
from sam_jax.train.prompts import interior


def _masks(s=64):
    yy, xx = np.mgrid[:s, :s]
    a = (np.abs(xx - 20) < 10) & (np.abs(yy - 30) < 6)
    b = (xx - 44) ** 2 + (yy - 40) ** 2 < 100
    return np.stack([a, b, np.zeros_like(a)])


def test_foreground_points_inside_and_deterministic():
    m = _masks()
    for seed in range(5):
        c, lab = sample_foreground_points(jax.random.PRNGKey(seed), jnp.asarray(m))
        c, lab = np.asarray(c), np.asarray(lab)
        assert c.shape == (3, 1, 2) and lab.shape == (3, 1)
        for i in range(2):
            x, y = c[i, 0].astype(int)
            assert m[i, y, x] and lab[i, 0] == 1
        assert lab[2, 0] == PAD_LABEL  # empty mask: no point
    c1 = sample_foreground_points(jax.random.PRNGKey(0), jnp.asarray(m))[0]
    c2 = sample_foreground_points(jax.random.PRNGKey(0), jnp.asarray(m))[0]
    c3 = sample_foreground_points(jax.random.PRNGKey(1), jnp.asarray(m))[0]
    assert np.array_equal(c1, c2) and not np.array_equal(c1, c3)


def test_point_margin_keeps_first_points_inside():
    """point_margin=m: every first point has its (2m+1)^2 square inside the mask, over many keys the
    points cover that interior; a mask too thin for the margin gets its deepest pixels."""
    m = _masks()
    m[2, 10, 5:60] = True  # a one-pixel line: no interior at margin 1 or 2
    m[2, 30:33, 20:40] = True  # a 3-pixel bar: an interior at margin 1 (its middle row), not 2
    mj = jnp.asarray(m)
    inner = np.asarray(interior(mj, 2))
    assert inner[2].sum() == 18 and inner[2, 31, 21:39].all()  # the fallback: the bar's middle row
    only_line = np.zeros_like(m[:1])
    only_line[0, 10, 5:60] = True
    assert np.array_equal(np.asarray(interior(jnp.asarray(only_line), 2)), only_line)  # all of it
    assert 0 < inner[0].sum() < m[0].sum() and 0 < inner[1].sum() < m[1].sum()
    seen = [set(), set()]
    for seed in range(200):
        c = np.asarray(sample_foreground_points(jax.random.PRNGKey(seed), mj, 2)[0])[:, 0].astype(int)
        for i in range(2):
            x, y = c[i]
            assert m[i, y - 2 : y + 3, x - 2 : x + 3].all()
            seen[i].add((x, y))
        assert c[2, 1] == 31 and 21 <= c[2, 0] <= 38
    assert len(seen[0]) > 0.5 * inner[0].sum()  # spread over the interior (uniform: ~85% hit in 200)
    assert np.array_equal(np.asarray(interior(mj, 0)), m)
    with pytest.raises(ValueError, match="point_margin"):
        PromptConfig(point_margin=-1)


def test_boxes_and_noise():
    m = _masks()
    boxes = np.asarray(mask_boxes(jnp.asarray(m)))
    np.testing.assert_array_equal(boxes[0], [11, 25, 29, 35])
    np.testing.assert_array_equal(boxes[2], [0, 0, 63, 63])  # empty mask: whole frame
    # Noise std is 10% of the side, capped at max_px: check it over many draws of one big box.
    big = jnp.tile(jnp.array([[100.0, 100.0, 900.0, 300.0]]), (4000, 1))
    noisy = np.asarray(noisy_boxes(jax.random.PRNGKey(0), big, 1024, 0.1, 20.0))
    std = (noisy - np.asarray(big)).std(axis=0)
    # width 800 -> 80 capped at 20; height 200 -> 20 (== cap). 4000 draws: sampling error ~1.1%.
    np.testing.assert_allclose(std, [20, 20, 20, 20], rtol=0.05)
    small = jnp.tile(jnp.array([[10.0, 10.0, 60.0, 40.0]]), (4000, 1))
    std = (np.asarray(noisy_boxes(jax.random.PRNGKey(1), small, 1024, 0.1, 20.0)) - np.asarray(small)).std(0)
    np.testing.assert_allclose(std, [5, 3, 5, 3], rtol=0.05)
    edge = np.asarray(noisy_boxes(jax.random.PRNGKey(2), jnp.array([[0.0, 0.0, 63.0, 63.0]] * 50), 64))
    assert edge.min() >= 0 and edge.max() <= 63
    assert np.all(edge[:, 2:] >= edge[:, :2])


def test_corrective_points_labels_and_uniformity():
    s = 32
    gt = np.zeros((1, s, s), bool)
    gt[0, :, :16] = True
    pred = np.zeros((1, s, s), bool)
    pred[0, :, 4:20] = True  # missed: columns 0..3 (4 px wide); wrong: columns 16..19 (4 wide)
    pred[0, :, 20:24] = True  # wrong region now 8 columns: 2/3 of the errors are negatives
    keys = jax.random.split(jax.random.PRNGKey(0), 3000)
    c, lab = jax.vmap(lambda k: sample_corrective_points(k, jnp.asarray(pred), jnp.asarray(gt)))(keys)
    c, lab = np.asarray(c)[:, 0], np.asarray(lab)[:, 0]
    x = c[:, 0].astype(int)
    assert np.all(np.where(lab == 1, x < 4, (x >= 16) & (x < 24)))
    # Uniform over the error region: P(negative) = 8 / 12; 3000 draws give a std of 0.009.
    assert abs(np.mean(lab == 0) - 2 / 3) < 0.04
    c, lab = sample_corrective_points(jax.random.PRNGKey(0), jnp.asarray(gt), jnp.asarray(gt))
    assert int(lab[0]) == PAD_LABEL  # perfect prediction: no point


@pytest.mark.parametrize("n,k", [(10, 2), (3, 1), (4, 0), (2, 3)])
def test_point_schedule(n, k):
    cfg = PromptConfig(corrective_points=n, no_point_rounds=k)
    seen = set()
    for seed in range(6):
        sched = np.asarray(point_schedule(jax.random.PRNGKey(seed), cfg))
        assert sched.shape == (n + k,) and sched.sum() == n
        if k:
            assert not sched[-1]
        seen.add(tuple(sched))
    if k == 2 and n > 1:
        assert len(seen) > 1  # the extra no-point round moves


def test_config_validation():
    with pytest.raises(ValueError):
        PromptConfig(box_prob=1.5)
    with pytest.raises(ValueError):
        PromptConfig(corrective_points=-1)


def _episode_inputs(tiny):
    """The tiny model, its params, two random image embeddings and two masks in its input frame."""
    model, params = tiny.model, tiny.params
    s = model.config.image_size
    g = model.config.embedding_size
    gt = jnp.asarray(
        np.stack(
            [np.pad(_masks(64)[0], ((20, s - 84), (30, s - 94))), np.pad(_masks(64)[1], ((50, s - 114), (10, s - 74)))]
        )
    )
    emb = jax.random.normal(jax.random.PRNGKey(5), (2, g, g, model.config.prompt_embed_dim))
    return model, params, emb, gt


@pytest.mark.full  # ~10 CPU-s: a multi-round episode compiled
def test_episode_is_a_function_of_the_key(tiny):
    model, params, emb, gt = _episode_inputs(tiny)
    cfg = PromptConfig(corrective_points=1, no_point_rounds=1, box_prob=0.5)
    f = jax.jit(lambda k: interactive_loss(model, params, emb, gt, k, cfg))
    runs = {int(seed): f(jax.random.PRNGKey(seed)) for seed in (0, 0, 1, 2, 3, 4, 5)}
    a, b = f(jax.random.PRNGKey(0)), f(jax.random.PRNGKey(0))
    assert float(a[0]) == float(b[0])  # same key: bitwise the same episode
    losses = {float(v[0]) for v in runs.values()}
    assert len(losses) > 1
    kinds = {float(v[1]["box_first"]) for v in runs.values()}
    assert kinds == {0.0, 1.0}  # both branches ran over these keys
    for _, m in runs.values():
        assert all(np.isfinite(float(x)) for x in m.values())
        assert 0.0 <= float(m["iou_first"]) <= 1.0


@pytest.mark.full  # ~50 CPU-s: two multi-round backward passes compiled
def test_remat_rounds_same_gradient_less_memory(tiny):
    """remat_rounds recomputes each later round in the backward pass: the loss and the gradient
    are those of the plain episode, and the compiled step keeps fewer activations."""
    model, params, emb, gt = _episode_inputs(tiny)
    cfg = PromptConfig(corrective_points=4, no_point_rounds=1, box_prob=0.0)
    dec = {k: v for k, v in params.items() if k != "image_encoder"}

    def grad_fn(remat):
        def loss(d):
            return interactive_loss(model, {**params, **d}, emb, gt, jax.random.PRNGKey(3), cfg, remat_rounds=remat)[0]

        return jax.jit(jax.value_and_grad(loss)).lower(dec).compile()

    plain, remat = grad_fn(False), grad_fn(True)
    (l0, g0), (l1, g1) = plain(dec), remat(dec)
    # The recomputation repeats the same float32 ops, but XLA may fuse them differently: rounding
    # differences only (~1e-7 relative), far below any real change of the objective.
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
    # Leaves whose gradient is itself rounding noise (~1e-9, e.g. a bias behind a LayerNorm) are
    # held to an absolute bound relative to the largest gradient entry.
    scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(g0))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 * scale)
    # 5 later rounds: the plain episode holds 6 rounds' activations, the remat one about 2.
    mem0, mem1 = plain.memory_analysis(), remat.memory_analysis()
    if mem0 is not None and mem1 is not None:  # not every backend reports it
        assert mem1.temp_size_in_bytes < 0.6 * mem0.temp_size_in_bytes
