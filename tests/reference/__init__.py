"""The official PyTorch SAM as the reference: built for any SamConfig, every tensor randomised.

Default init leaves pos_embed and rel_pos at 0 and norms at 1/0, which hides whole classes of bugs,
so every floating tensor of the state_dict is refilled before the model is saved and converted.
Imported as `tests.reference` by the tests and by bench/ (both from the repository root).
"""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np
import torch

from sam_jax.config import PIXEL_MEAN, PIXEL_STD, SamConfig
from tests import STANDIN  # noqa: F401  (the torchvision stand-in, already first on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

torch.set_num_threads(os.cpu_count() or 1)
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Mask logits are hyper_in (C/8) . upscaled (C/8): without this the random logits have a std of
# several units and masks flip sign on rounding noise only rarely, but scores saturate.
HYPERNET_OUT_SCALE = 1.0


def import_transformers():
    """`transformers`, with its SAM models importable. transformers imports torchvision when it finds
    one: the stand-in lacks the names it wants, and PyPI's torchvision, which the test extra pulls in,
    does not load against the CPU torch. Its availability check is cached: run it (and the SAM
    imports) with torchvision marked unimportable (None in sys.modules, which find_spec reports as
    absent), so transformers settles on "no torchvision", then put back what was there."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "torchvision"}
    sys.modules["torchvision"] = None
    try:
        import transformers
        from transformers.utils import import_utils

        if import_utils.is_torchvision_available():
            raise RuntimeError("transformers still sees torchvision: its availability check changed")
        transformers.SamModel, transformers.SamHQModel  # noqa: B018  (import them now, while hidden)
        return transformers
    finally:
        del sys.modules["torchvision"]
        sys.modules.update(saved)


def official_sam(cfg: SamConfig):
    """The official `Sam` for a config, as `build_sam._build_sam` assembles it; for a "tiny_vit"
    encoder, MobileSAM's (`mobile_sam`, as its `build_sam_vit_t` assembles it); for SAM-HQ
    (cfg.hq), SAM-HQ's official one (`segment_anything_hq`, with `MaskDecoderHQ`)."""
    decoder_kw = {}
    if cfg.hq:
        from segment_anything_hq.modeling import ImageEncoderViT, PromptEncoder, Sam, TwoWayTransformer
        from segment_anything_hq.modeling import MaskDecoderHQ as MaskDecoder

        decoder_kw = dict(vit_dim=cfg.encoder_embed_dim)
    elif cfg.encoder_type == "tiny_vit":
        from tests.reference.tiny_vit import official_tiny_vit

        from mobile_sam.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

        image_encoder = official_tiny_vit(
            img_size=cfg.image_size,
            embed_dims=cfg.tiny_vit_embed_dims,
            depths=cfg.tiny_vit_depths,
            num_heads=cfg.tiny_vit_num_heads,
            window_sizes=cfg.tiny_vit_window_sizes,
            mlp_ratio=cfg.mlp_ratio,
        )  # its neck is 256 wide, whatever prompt_embed_dim says: a config must agree (see config.py)
    else:
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    if cfg.encoder_type == "vit":
        image_encoder = vit_encoder(ImageEncoderViT, cfg)
    sam = Sam(
        image_encoder=image_encoder,
        prompt_encoder=prompt_encoder(PromptEncoder, cfg),
        mask_decoder=mask_decoder(MaskDecoder, TwoWayTransformer, cfg, **decoder_kw),
        pixel_mean=list(PIXEL_MEAN),
        pixel_std=list(PIXEL_STD),
    )
    return sam.eval()


# The parts of a reference model, built for a SamConfig from the classes of whichever package
# (segment_anything, mobile_sam, segment_anything_hq: the same constructors), as each package's
# build_sam assembles them. Default-initialised: `randomise_` refills them.


def vit_encoder(image_encoder_vit, cfg: SamConfig) -> torch.nn.Module:
    return image_encoder_vit(
        depth=cfg.encoder_depth,
        embed_dim=cfg.encoder_embed_dim,
        img_size=cfg.image_size,
        mlp_ratio=cfg.mlp_ratio,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=cfg.encoder_num_heads,
        patch_size=cfg.patch_size,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(cfg.encoder_global_attn_indexes),
        window_size=cfg.window_size,
        out_chans=cfg.prompt_embed_dim,
    )


def prompt_encoder(prompt_encoder_cls, cfg: SamConfig) -> torch.nn.Module:
    grid = cfg.image_size // cfg.patch_size
    return prompt_encoder_cls(
        embed_dim=cfg.prompt_embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(cfg.image_size, cfg.image_size),
        mask_in_chans=cfg.mask_in_chans,
    )


def mask_decoder(mask_decoder_cls, two_way_transformer, cfg: SamConfig, **kw) -> torch.nn.Module:
    """kw: the decoder's other arguments (SAM-HQ's `vit_dim`)."""
    return mask_decoder_cls(
        num_multimask_outputs=cfg.num_multimask_outputs,
        transformer=two_way_transformer(
            depth=cfg.decoder_depth,
            embedding_dim=cfg.prompt_embed_dim,
            mlp_dim=cfg.decoder_mlp_dim,
            num_heads=cfg.decoder_num_heads,
        ),
        transformer_dim=cfg.prompt_embed_dim,
        iou_head_depth=cfg.iou_head_depth,
        iou_head_hidden_dim=cfg.iou_head_hidden_dim,
        **kw,
    )


@torch.no_grad()
def randomise_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Refills EVERY floating tensor of the state_dict (parameters and buffers) in place: for
    MobileSAM's TinyViT also the BatchNorm statistics (running_mean random, running_var positive)
    and attention biases large enough to change every attention map. Then `.eval()`: TinyViT's
    attention caches its gathered bias (`ab`) when put in eval mode, and would keep the old one."""
    g = torch.Generator().manual_seed(seed)
    embeddings = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    batch_norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}

    def randn(shape, std):
        return torch.randn(shape, generator=g) * std

    for key, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        module, leaf = key.rsplit(".", 1)
        if leaf in ("rel_pos_h", "rel_pos_w", "pos_embed"):
            new = randn(t.shape, 0.5)  # large enough to change every attention map
        elif leaf == "attention_biases":
            new = randn(t.shape, 1.0)
        elif leaf in ("running_mean", "running_var"):
            assert module in batch_norms, key
            new = randn(t.shape, 0.2) if leaf == "running_mean" else 0.5 + torch.rand(t.shape, generator=g)
        elif leaf == "positional_encoding_gaussian_matrix":
            new = randn(t.shape, 1.0)
        elif module in embeddings:
            new = randn(t.shape, 1.0)
        elif leaf == "weight" and t.ndim == 1:  # LayerNorm / LayerNorm2d
            new = 1.0 + randn(t.shape, 0.2)
        elif leaf == "bias":
            new = randn(t.shape, 0.1)
        elif leaf == "weight":
            fan_in = t[0].numel() if "output_upscaling" not in module else t.shape[0]
            new = randn(t.shape, fan_in**-0.5)
        else:
            raise AssertionError(f"no randomisation rule for {key}")
        if "output_hypernetworks_mlps" in module and module.endswith("layers.2"):
            new = new * HYPERNET_OUT_SCALE
        t.copy_(new)
    return model.eval()


def to_nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def count_params_without_torch(path: str) -> int:
    """`sam_jax.load(path)` in a fresh interpreter where importing torch fails: its parameter
    count. Fails the test, with the child's stderr, if loading needed torch."""
    import subprocess

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import sam_jax\n"
        f"model, params = sam_jax.load({path!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(sam_jax.count_params(params))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip())


def max_rel_err(got, ref) -> float:
    """max |got - ref| / std(ref): the error measure of the parity tolerances."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.max(np.abs(got - ref)) / np.std(ref))
