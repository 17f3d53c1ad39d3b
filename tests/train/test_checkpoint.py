"""Orbax train-state checkpoints: a resumed run equals an uninterrupted one bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sam_jax.train import PromptConfig, TrainConfig, TrainState, make_optimizer, make_train_step
from sam_jax.train.checkpoint import Checkpointer

pytest.importorskip("orbax.checkpoint")

N = 4  # steps; the interrupted run stops after N // 2


def _leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


@pytest.mark.full  # ~35 CPU-s: a training run, stopped and resumed
def test_resume_is_bitwise_equal(tiny, tmp_path):
    model, params = tiny.model, tiny.params
    s, g = model.config.image_size, model.config.embedding_size
    # Warm-up + cosine schedule, clipping and weight decay: the optimizer state must carry the
    # step count and both moments for the resumed run to match.
    cfg = TrainConfig(
        learning_rate=1e-3,
        warmup_steps=2,
        decay_steps=N,
        prompts=PromptConfig(corrective_points=0, no_point_rounds=0, box_prob=0.0),
    )
    tx = make_optimizer(cfg, params)
    step = make_train_step(model, tx, cfg)
    rs = np.random.RandomState(0)
    emb = jnp.asarray(rs.randn(N, 2, g, g, model.config.prompt_embed_dim).astype(np.float32))
    yy, xx = np.mgrid[:s, :s]
    masks = jnp.asarray(
        np.stack(
            [
                [(xx - 40 - 10 * t) ** 2 + (yy - 70) ** 2 < 900, np.abs(xx - 100) + np.abs(yy - 60) < 30 + t]
                for t in range(N)
            ]
        )[:, None].repeat(2, 1)
    )  # (N, B=2, K=2, S, S)
    base = jax.random.PRNGKey(42)

    def run(state, start, stop):
        for t in range(start, stop):  # batch and key are functions of the step number
            state, _ = step(state, {"embeddings": emb[t], "masks": masks[t]}, jax.random.fold_in(base, t))
        return state

    straight = run(TrainState.create(params, tx), 0, N)

    ck = Checkpointer(tmp_path / "ckpt", max_to_keep=2)
    half = run(TrainState.create(params, tx), 0, N // 2)
    assert ck.save(half) == N // 2
    del half
    ck.close()
    ck = Checkpointer(tmp_path / "ckpt")
    assert ck.latest_step() == N // 2
    restored = ck.restore(TrainState.create(params, tx))  # a fresh template: nothing carried over
    assert int(restored.step) == N // 2
    resumed = run(restored, N // 2, N)

    a, b = _leaves(straight), _leaves(resumed)
    assert jax.tree_util.tree_structure(straight) == jax.tree_util.tree_structure(resumed)
    assert len(a) == len(b) and all(x.dtype == y.dtype and x.tobytes() == y.tobytes() for x, y in zip(a, b))
    # And the check has teeth: one step fewer differs.
    fewer = run(TrainState.create(params, tx), 0, N - 1)
    assert any(x.tobytes() != y.tobytes() for x, y in zip(_leaves(fewer.params), _leaves(straight.params)))


def test_restore_without_checkpoint_raises(tmp_path, tiny):
    ck = Checkpointer(tmp_path / "empty")
    assert ck.latest_step() is None
    with pytest.raises(ValueError, match="no checkpoint"):
        ck.restore(None)
    with pytest.raises(ValueError, match="max_to_keep"):
        Checkpointer(tmp_path / "x", max_to_keep=0)
