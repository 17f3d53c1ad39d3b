"""Fine-tuned params -> official .pth -> the official PyTorch model: same outputs as sam_jax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sam_jax
from convert.__main__ import main as convert_main
from sam_jax.checkpoints import ConversionError, export_pth, export_state_dict, flatten_params, unflatten_params
from tests.reference import max_rel_err, official_sam, to_nchw

# The core parity tolerances (tests/modeling/test_parity.py): low-res logits max abs error <= 1e-4 x std of
# the reference, IoU predictions <= 1e-5 absolute.
LOGIT_TOL = 1e-4
IOU_TOL = 1e-5


def _finetuned(params, seed):
    """Stands in for fine-tuned weights: every tensor moved, so a stale or missed key shows."""
    rs = np.random.RandomState(seed)
    return unflatten_params(
        {
            k: np.asarray(v) + (0.02 * rs.randn(*np.shape(v))).astype(np.float32)
            for k, v in flatten_params(params).items()
        }
    )


def _prompts(s):
    f = np.float32
    return dict(
        coords=f([[[0.3, 0.4], [0.6, 0.55]], [[0.5, 0.5], [0.2, 0.7]]]) * s,
        labels=np.array([[1, 0], [1, 1]]),
        boxes=f([[0.1, 0.1, 0.7, 0.8], [0.3, 0.2, 0.9, 0.6]]) * s,
    )


def _compare(model, params, tm, image):
    s = model.config.image_size
    p = _prompts(s)
    emb = jax.jit(model.apply, static_argnames="method")({"params": params}, image, method=sam_jax.Sam.encode_image)
    low, iou = jax.jit(model.apply, static_argnames=("method", "multimask_output"))(
        {"params": params}, emb, p["coords"], p["labels"], p["boxes"], method=sam_jax.Sam.decode, multimask_output=True
    )
    with torch.no_grad():
        t_emb = tm.image_encoder(to_nchw(image))
        sparse, dense = tm.prompt_encoder(
            points=(torch.from_numpy(p["coords"]), torch.from_numpy(p["labels"])),
            boxes=torch.from_numpy(p["boxes"]),
            masks=None,
        )
        t_low, t_iou = tm.mask_decoder(t_emb, tm.prompt_encoder.get_dense_pe(), sparse, dense, True)
    err = max_rel_err(low, t_low.numpy())
    iou_err = float(np.abs(np.asarray(iou) - t_iou.numpy()).max())
    return err, iou_err


def test_round_trip_tiny(tiny, tmp_path):
    params = _finetuned(tiny.params, 0)
    out = tmp_path / "finetuned.pth"
    export_pth(params, out)
    sd = torch.load(out, map_location="cpu", weights_only=True)
    tm = official_sam(tiny.model.config)
    tm.load_state_dict(sd, strict=True)  # every key, nothing extra
    image = np.random.RandomState(1).randn(1, 160, 160, 3).astype(np.float32)
    err, iou_err = _compare(tiny.model, jax.tree_util.tree_map(jnp.asarray, params), tm, image)
    print(f"tiny round trip: logits err/std {err:.1e}, iou err {iou_err:.1e}")
    assert err <= LOGIT_TOL and iou_err <= IOU_TOL


def test_round_trip_vit_b_through_registry(vit_b, tmp_path):
    """The official loader, sam_model_registry["vit_b"](checkpoint=...) (a strict load_state_dict),
    gets every tensor exactly; the decoder then matches on a random embedding. (The full-size
    encoder forward is covered by test_parity; the mapping is the same for every tensor.)"""
    from segment_anything import sam_model_registry

    params = _finetuned(vit_b.params, 1)
    path = tmp_path / "vit_b.safetensors"
    sam_jax.save(path, params, "vit_b")
    out = tmp_path / "vit_b.pth"
    export_pth(path, out)  # from the file: the config comes from its metadata
    tm = sam_model_registry["vit_b"](checkpoint=str(out)).eval()
    want = export_state_dict(params)
    got = tm.state_dict()
    assert set(got) == set(want) and len(got) == 314
    for k, v in want.items():
        assert np.array_equal(got[k].numpy(), v), k  # bitwise
    p = _prompts(1024)
    emb = np.random.RandomState(2).randn(1, 64, 64, 256).astype(np.float32)
    low, iou = jax.jit(vit_b.model.apply, static_argnames=("method", "multimask_output"))(
        {"params": jax.tree_util.tree_map(jnp.asarray, params)},
        emb,
        p["coords"],
        p["labels"],
        p["boxes"],
        method="decode",
        multimask_output=True,
    )
    with torch.no_grad():
        sparse, dense = tm.prompt_encoder(
            points=(torch.from_numpy(p["coords"]), torch.from_numpy(p["labels"])),
            boxes=torch.from_numpy(p["boxes"]),
            masks=None,
        )
        t_low, t_iou = tm.mask_decoder(to_nchw(emb), tm.prompt_encoder.get_dense_pe(), sparse, dense, True)
    err = max_rel_err(low, t_low.numpy())
    iou_err = float(np.abs(np.asarray(iou) - t_iou.numpy()).max())
    print(f"vit_b round trip (decoder): logits err/std {err:.1e}, iou err {iou_err:.1e}")
    assert err <= LOGIT_TOL and iou_err <= IOU_TOL


def test_lora_must_be_merged(tiny, tmp_path):
    pytest.importorskip("qwix")
    from sam_jax.train import add_lora, merge_lora

    _, lparams = add_lora(tiny.model, tiny.params, jax.random.PRNGKey(0), rank=2)
    with pytest.raises(ConversionError, match="LoRA"):
        export_pth(lparams, tmp_path / "x.pth")
    flat = flatten_params(lparams)
    for k in flat:
        if k.endswith("kernel_lora_b"):
            flat[k] = jnp.ones_like(flat[k]) * 0.01
    merged = merge_lora(unflatten_params(flat), alpha=2.0)
    sd = export_pth(merged, tmp_path / "merged.pth")
    key = "image_encoder.blocks.0.attn.qkv.weight"
    a = np.asarray(flat["image_encoder/blocks_0/attn/qkv/kernel_lora_a"])
    kernel = np.asarray(tiny.params["image_encoder"]["blocks_0"]["attn"]["qkv"]["kernel"])
    want = kernel + a @ np.full((2, 144), 0.01) * 1.0
    np.testing.assert_allclose(sd[key].numpy().T, want, rtol=0, atol=1e-6)


def test_bad_trees_raise(tiny, tmp_path):
    flat = dict(flatten_params(tiny.params))
    del flat["mask_decoder/iou_token/embedding"]
    with pytest.raises(ConversionError, match="iou_token"):
        export_pth(unflatten_params(flat), tmp_path / "x.pth")
    with pytest.raises(TypeError, match="params_path_or_params"):
        export_pth(3, tmp_path / "x.pth")
    with pytest.raises(ConversionError):
        export_pth(str(tmp_path / "missing.safetensors"), tmp_path / "x.pth")
    assert not (tmp_path / "x.pth").exists()


def test_cli_to_pytorch(tiny, tmp_path, capsys):
    """`python -m convert --to pytorch PARAMS.safetensors OUT.pth`; usage errors: one line, exit 2."""
    params = _finetuned(tiny.params, 2)
    src = tmp_path / "finetuned.safetensors"
    sam_jax.save(src, params, tiny.model.config)
    out = tmp_path / "finetuned.pth"
    capsys.readouterr()
    assert convert_main(["--to", "pytorch", str(src), str(out)]) == 0
    assert capsys.readouterr().out.startswith("exported tiny")
    tm = official_sam(tiny.model.config)
    tm.load_state_dict(torch.load(out, map_location="cpu", weights_only=True), strict=True)
    want = export_state_dict(params)
    for k, v in tm.state_dict().items():
        assert np.array_equal(v.numpy(), want[k]), k  # bitwise
    for argv in (["--to", "pytorch", str(src), str(tmp_path / "o.safetensors")], ["--to", "pytorch", str(src)]):
        assert convert_main(argv) == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1, argv
    assert convert_main(["--to", "pytorch", str(src), str(tmp_path / "no" / "o.pth")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write")
    assert convert_main(["--to", "pytorch", str(tmp_path / "missing.safetensors"), str(out)]) == 1
    assert capsys.readouterr().err.startswith("error: ")
