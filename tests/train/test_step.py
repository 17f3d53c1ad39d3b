"""The train step: parameter groups, frozen-encoder guarantees, LoRA, bf16/remat, fitting a batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax.checkpoints import flatten_params
from sam_jax.train import PromptConfig, TrainConfig, TrainState, add_lora, make_optimizer, make_train_step, param_labels

# One-round episodes keep compilation quick; the interactive rounds are tested in test_train_prompts
# and by the example's smoke run.
FAST = PromptConfig(corrective_points=0, no_point_rounds=0, box_prob=0.0)
FROZEN = TrainConfig(learning_rate=3e-3, prompts=FAST)
FULL = TrainConfig(learning_rate=1e-3, encoder="full", prompts=FAST)


@pytest.fixture(scope="module")
def frozen_step(setup):
    """One compiled frozen-encoder step shared by the tests below (compiling dominates their cost)."""
    tx = make_optimizer(FROZEN, setup[1])
    return tx, make_train_step(setup[0], tx, FROZEN)


@pytest.fixture(scope="module")
def full_step(setup):
    tx = make_optimizer(FULL, setup[1])
    return tx, make_train_step(setup[0], tx, FULL)


@pytest.fixture(scope="module")
def setup(tiny):
    model, params = tiny.model, tiny.params  # randomised official weights (conftest)
    s = model.config.image_size
    yy, xx = np.mgrid[:s, :s]
    masks = np.stack([(np.abs(xx - 50) < 25) & (np.abs(yy - 60) < 18), (xx - 110) ** 2 + (yy - 90) ** 2 < 600])
    batch_masks = jnp.asarray(np.stack([masks, masks[::-1]]))  # (B=2, K=2, S, S)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, s, s, 3))
    return model, params, images, batch_masks


def _copy(tree):
    return {k: np.array(v) for k, v in flatten_params(tree).items()}


def _shapes(tree):
    return sorted(tuple(x.shape) for x in jax.tree_util.tree_leaves(tree) if np.ndim(x) > 0)


def test_frozen_encoder_unchanged_and_stateless(setup, frozen_step):
    model, params, images, masks = setup
    tx, step = frozen_step
    state = TrainState.create(params, tx)
    labels = flatten_params(param_labels(params))
    trainable = {k: v for k, v in flatten_params(params).items() if labels[k] == "train"}
    # Optimizer state: Adam's two moments for every trainable leaf, nothing for frozen ones.
    assert _shapes(state.opt_state) == sorted(2 * [tuple(v.shape) for v in trainable.values() if v.ndim])
    before = _copy(params)
    for i in range(2):
        state, metrics = step(state, {"images": images, "masks": masks}, jax.random.PRNGKey(i))
        assert np.isfinite(float(metrics["loss"]))
    after = _copy(state.params)
    frozen = [k for k in before if labels[k] == "frozen"]
    assert any(k.startswith("image_encoder/") for k in frozen)
    assert "prompt_encoder/pe_layer/positional_encoding_gaussian_matrix" in frozen
    for k in frozen:  # bitwise: the step never adds anything to them
        assert before[k].tobytes() == after[k].tobytes(), k
    still = [k for k in trainable if np.array_equal(before[k], after[k])]
    # Leaves these prompts reach all move (the transformer and the IoU head); others (the mask
    # input path, box embeddings, hypernetworks of never-selected masks) get zero gradient, so only
    # weight decay, which is for leaves of ndim >= 2, moves them.
    assert not [k for k in still if k.startswith(("mask_decoder/transformer", "mask_decoder/iou_prediction_head"))]
    assert all(before[k].ndim == 1 for k in still), still
    assert _shapes(state.opt_state) == _shapes(TrainState.create(params, tx).opt_state)
    assert int(state.step) == 2


@pytest.mark.full  # ~15 CPU-s: the encoder and a second train step (embeddings in) compiled
def test_cached_embeddings_equal_images_path(setup, frozen_step):
    model, params, images, masks = setup
    tx, step = frozen_step
    emb = jax.jit(model.apply, static_argnames="method")({"params": params}, images, method=sam_jax.Sam.encode_image)
    s1, m1 = step(TrainState.create(params, tx), {"images": images, "masks": masks}, jax.random.PRNGKey(3))
    s2, m2 = step(TrainState.create(params, tx), {"embeddings": emb, "masks": masks}, jax.random.PRNGKey(3))
    # Same math; the encoder runs inside vs outside the step's jit, so fusion may differ by ulps.
    # (Params are not compared: Adam's first update is ~lr x sign(g), so ulp noise on a gradient
    # element near 0 moves it by up to 2 lr.)
    for k in ("loss", "grad_norm", "iou_first"):
        assert abs(float(m1[k]) - float(m2[k])) <= 1e-5 * abs(float(m1[k])), k


@pytest.mark.full  # ~50 CPU-s: the encoder's backward compiled, twice (full, LoRA)
def test_full_and_lora_modes(setup, full_step):
    pytest.importorskip("qwix")
    model, params, images, masks = setup
    batch = {"images": images, "masks": masks}
    before = _copy(params)
    tx, step = full_step
    state, _ = step(TrainState.create(params, tx), batch, jax.random.PRNGKey(0))
    after = _copy(state.params)
    enc = [k for k in before if k.startswith("image_encoder/")]
    assert sum(not np.array_equal(before[k], after[k]) for k in enc) > 0.9 * len(enc)

    lm, lparams = add_lora(model, params, jax.random.PRNGKey(1), rank=2)
    # B starts at 0: the adapted model equals the base model.
    e0 = model.apply({"params": params}, images, method=sam_jax.Sam.encode_image)
    e1 = lm.apply({"params": lparams}, images, method="encode_image")
    np.testing.assert_array_equal(np.asarray(e0), np.asarray(e1))
    cfg = TrainConfig(learning_rate=1e-3, encoder="lora", prompts=FAST)
    tx = make_optimizer(cfg, lparams)
    with pytest.raises(ValueError, match="LoRA adapters"):
        make_optimizer(FULL, lparams)
    lbefore = _copy(lparams)
    state = TrainState.create(lparams, tx)
    step = make_train_step(lm, tx, cfg)
    for i in range(2):  # the first step moves B only (A's gradient is 0 while B is 0)
        state, _ = step(state, batch, jax.random.PRNGKey(i))
    lafter = _copy(state.params)
    for k in lbefore:
        moved = not np.array_equal(lbefore[k], lafter[k])
        if k.startswith("image_encoder/"):
            assert moved == ("lora" in k.rsplit("/", 1)[-1]), k
    n_lora = sum("lora" in k for k in lbefore)
    assert n_lora == 4 * model.config.encoder_depth  # A and B on qkv and proj of each block


@pytest.mark.full  # ~30 CPU-s: another encoder-training step compiled
def test_bf16_and_remat(setup, full_step):
    """bf16 compute with rematerialised encoder blocks, encoder trained: fp32 params and state,
    a loss close to the fp32 one."""
    model, params, images, masks = setup
    tx, step32 = full_step
    batch = {"images": images, "masks": masks}
    _, m32 = step32(TrainState.create(params, tx), batch, jax.random.PRNGKey(0))
    low = sam_jax.build_sam("tiny", dtype=jnp.bfloat16, remat_encoder=True)
    state, m16 = make_train_step(low, tx, FULL)(TrainState.create(params, tx), batch, jax.random.PRNGKey(0))
    assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(state.params))
    # bf16 has an 8-bit mantissa (0.4% per rounding): the loss stays within a few percent.
    assert abs(float(m16["loss"]) - float(m32["loss"])) <= 0.05 * float(m32["loss"])
    assert float(m16["grad_norm"]) > 0


@pytest.mark.full  # ~20 CPU-s: 25 steps, with the embeddings-in step compiled
def test_fits_a_fixed_batch(setup, frozen_step):
    model, params, images, masks = setup
    emb = model.apply({"params": params}, images, method=sam_jax.Sam.encode_image)
    tx, step = frozen_step
    state = TrainState.create(params, tx)
    key = jax.random.PRNGKey(0)  # the same prompts every step: plain overfitting
    first = None
    for _ in range(25):
        state, m = step(state, {"embeddings": emb, "masks": masks}, key)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < 0.5 * first, (first, float(m["loss"]))


def test_errors(setup, full_step):
    model, params, images, masks = setup
    with pytest.raises(ValueError, match="encoder"):
        TrainConfig(encoder="half")
    with pytest.raises(ValueError, match="LoRA"):
        param_labels(params, "lora")
    tx, step = full_step
    emb = jnp.zeros((2, 10, 10, 48))
    with pytest.raises(ValueError, match="cached embeddings"):
        step(TrainState.create(params, tx), {"embeddings": emb, "masks": masks}, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="exactly one"):
        step(
            TrainState.create(params, tx), {"embeddings": emb, "images": images, "masks": masks}, jax.random.PRNGKey(0)
        )
    with pytest.raises(ValueError, match="masks"):
        step(TrainState.create(params, tx), {"images": images, "masks": masks[0]}, jax.random.PRNGKey(0))
