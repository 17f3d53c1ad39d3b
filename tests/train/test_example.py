"""Smoke runs of examples/finetune.py on tiny settings: outputs, resume, folder data."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import sam_jax

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples")
sys.path.insert(0, EXAMPLES)

# One-round episodes: compiling the step dominates these runs (the interactive rounds are tested
# in test_train_prompts; bitwise resume at the library level in test_train_checkpoint).
COMMON = [
    "--batch-size",
    "2",
    "--objects",
    "2",
    "--corrective-points",
    "0",
    "--no-point-rounds",
    "0",
    "--box-prob",
    "0",
    "--eval-every",
    "2",
    "--checkpoint-every",
    "2",
    "--warmup",
    "1",
    "--lr",
    "1e-3",
    "--no-progress",
]


def _run(argv):
    from finetune import main

    return main(argv)


@pytest.mark.full  # the example's training loop (~45 CPU-s)
def test_synthetic_stop_and_resume(tmp_path, tiny):
    """A run stopped at step 2 (after its checkpoint) and resumed: the history continues, the
    outputs are written once the last step is done."""
    pytest.importorskip("orbax.checkpoint")
    base = COMMON + [
        "--weights",
        tiny.weights,
        "--synthetic",
        "6",
        "--heldout",
        "2",
        "--steps",
        "4",
        "--out",
        str(tmp_path),
    ]
    hist = _run(base + ["--stop-after", "2", "--no-plots"])
    assert len(hist["loss"]) == 2 and not (tmp_path / "params.safetensors").exists()
    assert (tmp_path / "train_embeddings.npz").exists()  # frozen encoder: embeddings cached once
    plots = [] if _has_matplotlib() else ["--no-plots"]
    resumed = _run(base + ["--resume"] + plots)
    assert resumed["loss"][:2] == hist["loss"] and len(resumed["loss"]) == 4
    assert resumed["eval_step"] == [2, 4] and all(np.isfinite(resumed["loss"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0.0 <= summary["heldout_iou"] <= 1.0 and summary["heldout_masks"] >= 2
    if not plots:
        assert (tmp_path / "curves.png").stat().st_size > 0 and (tmp_path / "overlays.png").stat().st_size > 0
    model, _ = sam_jax.load(tmp_path / "params.safetensors")
    assert model.config == sam_jax.get_config("tiny")


@pytest.mark.full  # the example's training loop (~20 CPU-s)
def test_folder_data(tmp_path, tiny):
    """A folder of non-square images with label PNGs. (LoRA / full fine-tuning through the same
    step are tested in test_train_step; merging LoRA before export in test_train_export.)"""
    from sam_jax.train.synthetic import synthetic_sample

    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    for i in range(4):
        img, masks = synthetic_sample(i, 120, seed=3)
        Image.fromarray(img[:, :100]).save(tmp_path / "images" / f"im{i}.jpg")  # not square
        labels = np.zeros(masks.shape[1:], np.uint8)
        for j, m in enumerate(masks):
            labels[m] = j + 1
        Image.fromarray(labels[:, :100]).save(tmp_path / "masks" / f"im{i}.png")
    out = tmp_path / "run"
    hist = _run(
        COMMON
        + [
            "--weights",
            tiny.weights,
            "--images",
            str(tmp_path / "images"),
            "--masks",
            str(tmp_path / "masks"),
            "--steps",
            "2",
            "--val-fraction",
            "0.25",
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    assert len(hist["loss"]) == 2 and np.isfinite(hist["loss"]).all()
    model, _ = sam_jax.load(out / "params.safetensors")
    assert model.config == sam_jax.get_config("tiny")


@pytest.mark.full  # the example's training loop, encoder trained (~50 CPU-s)
def test_scratch_config_trains_encoder_on_augmented_images(tmp_path):
    """The CPU from-scratch recipe's path: a SCRATCH_CONFIGS model, the encoder in the gradient,
    first points inside the masks (--point-margin), images drawn by mask count (--sample-by mask),
    images augmented per step (--augment). --augment with cached embeddings is a usage error."""
    out = tmp_path / "run"
    hist = _run(
        COMMON
        + [
            "--model",
            "nano64",
            "--encoder",
            "full",
            "--augment",
            "--synthetic",
            "4",
            "--point-margin",
            "2",
            "--sample-by",
            "mask",
            "--heldout",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            "--no-plots",
        ]
    )
    assert len(hist["loss"]) == 2 and np.isfinite(hist["loss"]).all()
    model, _ = sam_jax.load(out / "params.safetensors")
    from finetune import SCRATCH_CONFIGS

    assert model.config == SCRATCH_CONFIGS["nano64"] and model.config.image_size == 64
    with pytest.raises(SystemExit) as exc:
        _run(["--synthetic", "4", "--augment", "--out", str(tmp_path / "x")])  # encoder frozen
    assert exc.value.code == 2


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--point-margin", "-1"),
        ("--steps", "0"),
        ("--batch-size", "0"),
        ("--objects", "0"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--warmup", "-1"),
        ("--weight-decay", "-0.1"),
        ("--corrective-points", "-1"),
        ("--no-point-rounds", "-2"),
        ("--box-prob", "1.5"),
        ("--val-fraction", "1"),
        ("--heldout", "0"),
        ("--eval-every", "0"),
        ("--checkpoint-every", "0"),
        ("--stop-after", "-1"),
        ("--lora-rank", "0"),
        ("--lora-alpha", "inf"),
        ("--synthetic", "-4"),
        ("--steps", "ten"),
    ],
)
def test_out_of_range_flags_are_usage_errors(tmp_path, capsys, flag, value):
    """A number outside its flag's range stops the run before anything is built: exit 2 and one
    line that names the flag, not a crash or a silently odd run later."""
    with pytest.raises(SystemExit) as exc:
        _run(["--synthetic", "4", flag, value, "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and value in err, err


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.full  # the example's training loop on SAM-HQ (~30 CPU-s)
def test_sam_hq_trains_only_hq_parts(tmp_path, tiny_hq):
    """--decoder hq on SAM-HQ weights: the run trains and writes SAM-HQ params in which only the
    parts SAM-HQ adds moved (the paper's recipe; the step's own test is tests/train/test_hq.py)."""
    from sam_jax.checkpoints import flatten_params
    from sam_jax.train.step import param_labels

    out = tmp_path / "run"
    argv = ["--weights", tiny_hq.weights, "--decoder", "hq", "--synthetic", "4", "--heldout", "2", "--steps", "2"]
    hist = _run(COMMON + argv + ["--out", str(out), "--no-plots"])
    assert len(hist["loss"]) == 2 and np.isfinite(hist["loss"]).all()
    model, params = sam_jax.load(out / "params.safetensors")
    assert model.config == tiny_hq.model.config
    labels = flatten_params(param_labels(tiny_hq.params, decoder="hq"))
    before = flatten_params(tiny_hq.params)
    after = flatten_params(params)
    moved = {k for k in before if not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))}
    assert moved and all(labels[k] == "train" for k in moved), sorted(
        moved - {k for k in labels if labels[k] == "train"}
    )
