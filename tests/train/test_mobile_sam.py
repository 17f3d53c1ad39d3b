"""Fine-tuning MobileSAM: TinyViT's BatchNorm statistics stay frozen in every encoder mode (they are
buffers in the official model), LoRA finds TinyViT's attention projections, and a full-encoder
step moves the weights but not the statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sam_jax
from sam_jax.checkpoints import flatten_params
from sam_jax.train import PromptConfig, TrainConfig, TrainState, add_lora, make_optimizer, make_train_step, param_labels

STATISTICS = ("running_mean", "running_var")


@pytest.mark.parametrize("encoder", ["frozen", "full"])
def test_statistics_are_always_frozen(encoder):
    shapes = sam_jax.param_shapes(sam_jax.build_sam("tiny_mobile_sam"))
    labels = flatten_params(param_labels(shapes, encoder))
    stats = [k for k in labels if k.rsplit("/", 1)[1] in STATISTICS]
    # 17 BatchNorms in this layout: 2 in the stem, 3 in the MBConv, 3 in each of 3 merges, one
    # local_conv in each of 3 TinyViT blocks.
    assert len(stats) == 2 * 17
    assert {labels[k] for k in stats} == {"frozen"}
    weights = {labels[k] for k in labels if k.startswith("image_encoder/") and k not in stats}
    assert weights == {"frozen" if encoder == "frozen" else "train"}


def test_lora_targets_tiny_vit_attention():
    model = sam_jax.build_sam("tiny_mobile_sam")
    shapes = sam_jax.param_shapes(model)  # add_lora only copies the existing leaves
    _, params = add_lora(model, shapes, jax.random.PRNGKey(0), rank=2)
    adapters = sorted(k for k in flatten_params(params) if "lora" in k)
    # One attention block in each of stages 1-3, qkv and proj, A and B.
    assert len(adapters) == 3 * 2 * 2
    assert "image_encoder/layers_1/blocks_0/attn/qkv/kernel_lora_a" in adapters
    labels = flatten_params(param_labels(params, "lora"))
    assert {labels[k] for k in adapters} == {"train"}
    assert {labels[k] for k in labels if k.endswith(STATISTICS)} == {"frozen"}


@pytest.mark.full  # ~40 CPU-s: TinyViT's backward at 1024 x 1024, compiled
def test_full_encoder_step_keeps_statistics(tmp_path):
    model = sam_jax.build_sam("tiny_mobile_sam")
    params = sam_jax.init_params(model, jax.random.PRNGKey(0))
    flat = flatten_params(params)
    # Valid statistics (init leaves them at 0 / 1, which would hide a step that moved them).
    rng = np.random.default_rng(0)
    for k in flat:
        if k.endswith("running_mean"):
            flat[k] = jnp.asarray(rng.normal(0, 0.2, flat[k].shape), jnp.float32)
        elif k.endswith("running_var"):
            flat[k] = jnp.asarray(rng.uniform(0.5, 1.5, flat[k].shape), jnp.float32)
    params = sam_jax.checkpoints.unflatten_params(flat)
    s = model.config.image_size
    yy, xx = np.mgrid[:s, :s]
    masks = jnp.asarray(((np.abs(xx - 400) < 200) & (np.abs(yy - 500) < 150))[None, None])  # (B=1, K=1, S, S)
    images = jax.random.normal(jax.random.PRNGKey(1), (1, s, s, 3))
    config = TrainConfig(
        learning_rate=1e-3, encoder="full", prompts=PromptConfig(corrective_points=0, no_point_rounds=0, box_prob=0.0)
    )
    tx = make_optimizer(config, params)
    step = make_train_step(model, tx, config)
    state, metrics = step(TrainState.create(params, tx), {"images": images, "masks": masks}, jax.random.PRNGKey(2))
    assert np.isfinite(float(metrics["loss"]))
    after = flatten_params(state.params)
    for k, v in flat.items():
        same = np.array_equal(np.asarray(after[k]), np.asarray(v))
        if k.endswith(STATISTICS):
            assert same, k  # bitwise: never updated
    moved = [k for k in flat if k.endswith("/kernel") and k.startswith("image_encoder/")]
    assert any(not np.array_equal(np.asarray(after[k]), np.asarray(flat[k])) for k in moved)
