"""Meta's official SAM state_dict <-> sam_jax Flax params.

The Flax tree mirrors the official module tree, so the mapping is a few rules, not a table:
  * module path: "blocks.3" <-> "blocks_3" (list and nn.Sequential indices), "." <-> "/";
  * leaf: "weight" -> whichever of kernel (Dense / Conv), scale (LayerNorm) or embedding (Embed) the
    Flax module has; every other leaf name (bias, pos_embed, rel_pos_h, ...) is kept;
  * layout: the transforms below, chosen by the leaf and the tensor rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from ..build import build_sam, param_shapes
from ..config import SamConfig, get_config, preset_name
from ..modeling.mask_decoder import HQ_PARTS
from .errors import ConversionError, printable
from .params import check_depths, flatten_params, unflatten_params

# torch Linear weight (out, in) -> Flax Dense kernel (in, out).
LINEAR_TO_FLAX = (1, 0)
# torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out).
CONV_TO_FLAX = (2, 3, 1, 0)
# torch ConvTranspose2d weight (in, out, kh, kw) -> Flax ConvTranspose kernel (kh, kw, in, out),
# spatially FLIPPED: lax.conv_transpose without transpose_kernel correlates with the kernel as
# given, torch's transposed conv with its spatial mirror. Only the upscaling layers are transposed.
CONV_TRANSPOSE_TO_FLAX = (2, 3, 0, 1)
CONV_TRANSPOSE_MODULES = frozenset(
    {
        "mask_decoder.output_upscaling.0",
        "mask_decoder.output_upscaling.3",
        # SAM-HQ's (its embedding_maskfeature convolutions are ordinary Conv2d).
        "mask_decoder.compress_vit_feat.0",
        "mask_decoder.compress_vit_feat.3",
        "mask_decoder.embedding_encoder.0",
        "mask_decoder.embedding_encoder.3",
    }
)

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def flax_module_path(torch_module: str) -> str:
    """ "image_encoder.blocks.3.attn" -> "image_encoder/blocks_3/attn"."""
    out: list[str] = []
    for part in torch_module.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return "/".join(out)


def torch_module_path(flax_module: str) -> str:
    """Inverse of `flax_module_path`."""
    return ".".join(re.sub(r"_(\d+)$", r".\1", p) for p in flax_module.split("/"))


def torch_key(flax_key: str) -> str:
    """The official state_dict key of a flattened Flax param path."""
    module, leaf = flax_key.rsplit("/", 1)
    return f"{torch_module_path(module)}.{'weight' if leaf in _WEIGHT_LEAVES else leaf}"


def _to_flax_layout(module: str, leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return x
    if x.ndim == 2:
        return x.transpose(LINEAR_TO_FLAX)
    if module in CONV_TRANSPOSE_MODULES:
        return x.transpose(CONV_TRANSPOSE_TO_FLAX)[::-1, ::-1]
    return x.transpose(CONV_TO_FLAX)


def _to_torch_layout(module: str, leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf != "kernel":
        return x
    if x.ndim == 2:
        return x.transpose(LINEAR_TO_FLAX)
    if module in CONV_TRANSPOSE_MODULES:
        return x[::-1, ::-1].transpose(np.argsort(CONV_TRANSPOSE_TO_FLAX))
    return x.transpose(np.argsort(CONV_TO_FLAX))


def _flax_shape(module: str, leaf: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape after `_to_flax_layout` (module is a torch module path)."""
    return tuple(_to_flax_layout(module, leaf, np.empty(shape, np.uint8)).shape)


def _torch_shape(flax_key: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Shape of the official tensor behind a Flax param of `shape`."""
    module, leaf = flax_key.rsplit("/", 1)
    return tuple(_to_torch_layout(torch_module_path(module), leaf, np.empty(shape, np.uint8)).shape)


# ---------------------------------------------------------------------------------------------
# Model type from shapes


def _depth(shapes: Mapping[str, Tuple[int, ...]], prefix: str, leaf: str) -> int:
    """How many numbered blocks `prefix.{i}` there are: one past the last that holds `leaf`, a key
    every such block has. A stray key of a block that is not there (`blocks.99.norm1.weight`) does
    not count, so it is reported as one unexpected key rather than as a deeper model."""
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\." + re.escape(leaf))
    return max((int(m.group(1)) + 1 for k in shapes for m in [pat.fullmatch(k)] if m), default=0)


# SAM-HQ's decoder additions (the ViT width they read must be the encoder's): a checkpoint with any
# of them is SAM-HQ's, so one that lacks some is told which, not that all the others are unexpected.
HQ_PREFIXES = tuple(f"mask_decoder.{part}." for part in HQ_PARTS)
# Keys that tell the image encoder's family (MobileSAM's TinyViT begins with a BatchNorm'd conv stem).
TINY_VIT_KEY = "image_encoder.patch_embed.seq.0.c.weight"
_VIT_NEED = (
    "image_encoder.patch_embed.proj.weight",
    "image_encoder.pos_embed",
    "image_encoder.blocks.0.attn.rel_pos_h",
    "image_encoder.blocks.0.mlp.lin1.weight",
)
_TINY_VIT_NEED = (TINY_VIT_KEY, "image_encoder.patch_embed.seq.2.c.weight")
_DECODER_NEED = (
    "image_encoder.neck.0.weight",
    "prompt_encoder.mask_downscaling.3.weight",
    "mask_decoder.mask_tokens.weight",
    "mask_decoder.transformer.layers.0.mlp.lin1.weight",
    "mask_decoder.iou_prediction_head.layers.0.weight",
)


def detect_config(shapes: Mapping[str, Tuple[int, ...]]) -> SamConfig:
    """Infers the SamConfig from the state_dict's tensor shapes: SAM's ViT or MobileSAM's TinyViT
    (see `_tiny_vit_fields`), then the shared prompt encoder and mask decoder (the decoder's head
    count, which no shape records, is the official 8). Raises ConversionError if a needed tensor
    is missing."""
    tiny = TINY_VIT_KEY in shapes
    missing = [k for k in (_TINY_VIT_NEED if tiny else _VIT_NEED) + _DECODER_NEED if k not in shapes]
    if missing:
        raise ConversionError(
            "cannot detect the model type: this does not look like a SAM checkpoint",
            [f"missing key {k}" for k in missing],
        )
    try:
        encoder = _tiny_vit_fields(shapes) if tiny else _vit_fields(shapes)
        cfg = SamConfig(
            **encoder,
            prompt_embed_dim=shapes["image_encoder.neck.0.weight"][0],
            mask_in_chans=shapes["prompt_encoder.mask_downscaling.3.weight"][0],
            decoder_depth=_depth(shapes, "mask_decoder.transformer.layers", "mlp.lin1.weight"),
            decoder_mlp_dim=shapes["mask_decoder.transformer.layers.0.mlp.lin1.weight"][0],
            num_multimask_outputs=shapes["mask_decoder.mask_tokens.weight"][0] - 1,
            iou_head_depth=_depth(shapes, "mask_decoder.iou_prediction_head.layers", "weight"),
            iou_head_hidden_dim=shapes["mask_decoder.iou_prediction_head.layers.0.weight"][0],
            hq=any(k.startswith(HQ_PREFIXES) for k in shapes),
        )
    except (ValueError, IndexError, ZeroDivisionError, TypeError) as e:
        raise ConversionError(f"cannot detect the model type from the tensor shapes ({e})") from None
    return cfg


def _vit_fields(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Any]:
    embed_dim, _, patch, _ = shapes["image_encoder.patch_embed.proj.weight"]
    grid = shapes["image_encoder.pos_embed"][1]
    depth = _depth(shapes, "image_encoder.blocks", "attn.rel_pos_h")
    rel = [shapes.get(f"image_encoder.blocks.{i}.attn.rel_pos_h", (0, 0)) for i in range(depth)]
    head_dim = rel[0][1]
    global_idx = tuple(i for i, r in enumerate(rel) if r[0] == 2 * grid - 1)
    windowed = [r[0] for i, r in enumerate(rel) if i not in global_idx]
    return dict(
        encoder_embed_dim=embed_dim,
        encoder_depth=depth,
        encoder_num_heads=embed_dim // head_dim,
        encoder_global_attn_indexes=global_idx,
        image_size=grid * patch,
        patch_size=patch,
        window_size=(windowed[0] + 1) // 2 if windowed else SamConfig.window_size,
        mlp_ratio=shapes["image_encoder.blocks.0.mlp.lin1.weight"][0] / embed_dim,
    )


def _tiny_vit_fields(shapes: Mapping[str, Tuple[int, ...]]) -> Dict[str, Any]:
    """TinyViT's stages from the shapes. A stage's width is its stem's or the previous stage's
    merge output; its heads and window come from its first block's attention biases (heads,
    window^2). What no tensor records keeps MobileSAM's value: the image size (TinyViT has no
    position embedding; 1024), stage 0's heads and window (a convolutional stage does not use
    them) and those of a stage without blocks."""
    layers = "image_encoder.layers"
    merges = _depth(shapes, layers, "downsample.conv1.c.weight")
    widths = [shapes["image_encoder.patch_embed.seq.2.c.weight"][0]]
    widths += [shapes[f"{layers}.{i}.downsample.conv3.c.weight"][0] for i in range(merges)]
    depths = [_depth(shapes, f"{layers}.0.blocks", "conv1.c.weight")]
    default = SamConfig(encoder_type="tiny_vit")
    heads, windows, mlp_ratio = [default.tiny_vit_num_heads[0]], [default.tiny_vit_window_sizes[0]], None
    for i in range(1, len(widths)):
        depths.append(_depth(shapes, f"{layers}.{i}.blocks", "attn.attention_biases"))
        if depths[-1]:
            n_heads, offsets = shapes[f"{layers}.{i}.blocks.0.attn.attention_biases"]
            heads.append(n_heads)
            windows.append(math.isqrt(offsets))
            if mlp_ratio is None:
                mlp_ratio = shapes[f"{layers}.{i}.blocks.0.mlp.fc1.weight"][0] / widths[i]
        else:
            heads.append(1)
            windows.append(1)
    return dict(
        encoder_type="tiny_vit",
        tiny_vit_embed_dims=tuple(widths),
        tiny_vit_depths=tuple(depths),
        tiny_vit_num_heads=tuple(heads),
        tiny_vit_window_sizes=tuple(windows),
        mlp_ratio=default.mlp_ratio if mlp_ratio is None else mlp_ratio,
    )


def describe(cfg: SamConfig) -> str:
    name = preset_name(cfg)
    if cfg.encoder_type == "tiny_vit":
        dims = f"TinyViT, stage widths {list(cfg.tiny_vit_embed_dims)}, blocks {list(cfg.tiny_vit_depths)}"
    else:
        dims = f"embed dim {cfg.encoder_embed_dim}, {cfg.encoder_depth} blocks, image size {cfg.image_size}"
    if cfg.hq:
        dims = f"SAM-HQ, {dims}"
    return f"{name} ({dims})" if name else f"a custom model ({dims})"


def resolve_config(shapes: Mapping[str, Tuple[int, ...]], model_type: Any = "auto") -> SamConfig:
    """ "auto" -> detected from shapes; a preset name or SamConfig -> that, checked against shapes."""
    if model_type is None or model_type == "auto":
        return detect_config(shapes)
    cfg = get_config(model_type)
    try:
        found = detect_config(shapes)
    except ConversionError:
        return cfg  # let the key-by-key check report what is wrong
    # The decoder's head count is invisible in shapes: compare everything else.
    if found != dataclasses.replace(cfg, decoder_num_heads=found.decoder_num_heads):
        raise ConversionError(
            f"model type {model_type if isinstance(model_type, str) else 'given'} does not match the "
            f"checkpoint, which looks like {describe(found)}; expected {describe(cfg)}. "
            "Use --model-type auto."
        )
    return cfg


# ---------------------------------------------------------------------------------------------
# Conversion


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{printable(key)}: expected a tensor or numpy array, got {type(value).__name__}")
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def plan_conversion(
    shapes: Mapping[str, Tuple[int, ...]], model_type: Any = "auto"
) -> Tuple[SamConfig, Dict[str, str]]:
    """Checks a state_dict's keys and shapes against the model, without touching any data.

    Returns the config and {official key: Flax path}. Strict: every key consumed, every parameter
    filled, every shape checked against the model's `jax.eval_shape`; all problems are raised
    together in one ConversionError.
    """
    cfg = resolve_config(shapes, model_type)
    try:
        check_depths(cfg, len(shapes))
    except ValueError as e:
        raise ConversionError(f"the checkpoint does not fit {describe(cfg)}: {e}") from None
    target = flatten_params(param_shapes(build_sam(cfg)))
    problems: list[str] = []
    mapping: Dict[str, str] = {}
    for key, shape in shapes.items():
        module, _, leaf = key.rpartition(".")
        fmod = flax_module_path(module)
        if _not_a_parameter(cfg, fmod, leaf, target):
            continue
        if leaf == "weight":
            leaf = next((w for w in _WEIGHT_LEAVES if f"{fmod}/{w}" in target), "weight")
        fkey = f"{fmod}/{leaf}"
        if not module or fkey not in target:
            problems.append(f"unexpected key {printable(key)} {tuple(shape)}")
            continue
        mapping[key] = fkey
        want = tuple(target[fkey].shape)
        if _flax_shape(module, leaf, tuple(shape)) != want:
            problems.append(f"{key}: shape {tuple(shape)}, expected {_torch_shape(fkey, want)}")
    problems += [
        f"missing key {torch_key(k)} {_torch_shape(k, tuple(target[k].shape))}"
        for k in sorted(set(target) - set(mapping.values()))
    ]
    if problems:
        raise fit_error(cfg, problems)
    return cfg, mapping


# Kinds of problem, in the order a summary names them, with their plurals.
_KINDS = {
    "missing key": "missing keys",
    "wrong shape": "wrong shapes",
    "unexpected key": "unexpected keys",
    "other problem": "other problems",
}


def _kind(problem: str) -> str:
    if problem.startswith(("missing key", "unexpected key")):
        return " ".join(problem.split(" ", 2)[:2])
    return "wrong shape" if ": shape " in problem else "other problem"


def fit_error(cfg: SamConfig, problems: list[str]) -> ConversionError:
    """The error of a checkpoint that does not fit `cfg`: the model it was checked against, then
    the problems counted by kind, so that one stray key reads "vit_b (...) plus 1 unexpected key"."""
    counts = {kind: 0 for kind in _KINDS}
    for p in problems:
        counts[_kind(p)] += 1
    summary = ", ".join(f"{n} {kind if n == 1 else _KINDS[kind]}" for kind, n in counts.items() if n)
    if counts["unexpected key"] == len(problems):
        return ConversionError(f"the checkpoint holds {describe(cfg)} plus {summary}", problems, cfg)
    return ConversionError(f"the checkpoint does not fit {describe(cfg)}: {summary}", problems, cfg)


# MobileSAM's TinyViT keeps an image classifier the forward never calls (`norm_head`, `head`:
# LayerNorm and Linear over the last stage's width to CLASSIFIER_CLASSES logits).
TINY_VIT_CLASSIFIER = ("image_encoder/norm_head", "image_encoder/head")
CLASSIFIER_CLASSES = 1000


def _not_a_parameter(cfg: SamConfig, fmod: str, leaf: str, target: Mapping[str, Any]) -> bool:
    """State_dict entries with no parameter here, read past by the converter and written back by
    `export_state_dict`: BatchNorm's training counter (`num_batches_tracked`) and TinyViT's
    classifier."""
    if leaf == "num_batches_tracked":
        return f"{fmod}/running_mean" in target
    return cfg.encoder_type == "tiny_vit" and fmod in TINY_VIT_CLASSIFIER


def _unused_tensors(flat: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """What the official model's strict `load_state_dict` needs beside the parameters (see
    `_not_a_parameter`): each BatchNorm's counter (0: these statistics were not counted here), and
    for a TinyViT its classifier as an identity LayerNorm and a zero Linear (never called by the
    segmentation forward; MobileSAM ships trained ones, which the conversion left behind)."""
    out: Dict[str, np.ndarray] = {}
    for fkey in flat:
        module, leaf = fkey.rsplit("/", 1)
        if leaf == "running_mean":
            out[f"{torch_module_path(module)}.num_batches_tracked"] = np.zeros((), np.int64)
    neck_in = flat.get("image_encoder/neck_0/kernel")
    if "image_encoder/patch_embed/seq_0/c/kernel" in flat and neck_in is not None:
        width = np.shape(neck_in)[2]  # the last stage's width: the neck's input channels
        norm, head = (torch_module_path(m) for m in TINY_VIT_CLASSIFIER)
        out[f"{norm}.weight"] = np.ones(width, np.float32)
        out[f"{norm}.bias"] = np.zeros(width, np.float32)
        out[f"{head}.weight"] = np.zeros((CLASSIFIER_CLASSES, width), np.float32)
        out[f"{head}.bias"] = np.zeros(CLASSIFIER_CLASSES, np.float32)
    return out


def convert_state_dict(state_dict: Mapping[str, Any], model_type: Any = "auto") -> Tuple[SamConfig, Dict[str, Any]]:
    """Official SAM state_dict (torch tensors or numpy arrays) -> (SamConfig, nested Flax params).

    `model_type`: "auto" (detect from shapes), a preset name or a SamConfig. Raises ConversionError
    listing every problem (see `plan_conversion`).
    """
    state_dict = unwrap(state_dict)
    problems: list[str] = []
    arrays: Dict[str, np.ndarray] = {}
    for k, v in state_dict.items():
        try:
            arrays[k] = _to_numpy(v, k)
        except TypeError as e:
            problems.append(str(e))
    if problems:
        raise ConversionError("the checkpoint holds values that are not tensors", problems)
    cfg, mapping = plan_conversion({k: tuple(v.shape) for k, v in arrays.items()}, model_type)
    out = {}
    for key, fkey in mapping.items():
        module, _, leaf = key.rpartition(".")
        out[fkey] = np.ascontiguousarray(_to_flax_layout(module, fkey.rsplit("/", 1)[1], arrays[key]))
    return cfg, unflatten_params(out)


def export_state_dict(params: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """sam_jax params -> official state_dict layout (numpy), the inverse of convert_state_dict,
    with the tensors the official model holds beside its parameters (see `_unused_tensors`)."""
    out = {}
    flat = flatten_params(dict(params))
    for fkey, value in flat.items():
        module, leaf = fkey.rsplit("/", 1)
        out[torch_key(fkey)] = np.ascontiguousarray(
            _to_torch_layout(torch_module_path(module), leaf, np.asarray(value))
        )
    out.update(_unused_tensors(flat))
    return out


def unwrap(obj: Any) -> Mapping[str, Any]:
    """Accepts a bare state_dict or the common {"model": ...} / {"state_dict": ...} wrappers."""
    for _ in range(2):
        if isinstance(obj, Mapping) and len(obj) >= 1 and not any("." in str(k) for k in obj):
            inner = next((obj[k] for k in ("model", "state_dict") if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"expected a state_dict (a mapping of names to tensors), got {type(obj).__name__}")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise ConversionError("state_dict keys must be strings", [f"key {k!r}" for k in bad])
    return obj


# ---------------------------------------------------------------------------------------------
# Reading .pth files


def read_pth(path: str | os.PathLike) -> Mapping[str, Any]:
    """Reads an official checkpoint with torch.load(weights_only=True); never unpickles code."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise ConversionError(f"{path}: the file is empty")
    try:
        import torch
    except ImportError:
        raise ConversionError("reading .pth checkpoints needs PyTorch: pip install 'sam-jax[torch]'") from None
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    if head != b"PK" and head[:1] != b"\x80":  # zip archive (torch >= 1.6) or legacy pickle
        raise ConversionError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # a corrupt pickle's protocol number: the error below says it
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types; each is summarised in one line
        raise ConversionError(f"{path}: {_summarise_load_error(e)}") from None
    return unwrap(obj)


def _summarise_load_error(e: BaseException) -> str:
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    glob = next((ln for ln in lines if "GLOBAL" in ln), None)
    if glob is not None:
        return (
            "refused to load: the pickle asks for a non-tensor object, which could run code "
            f"({glob}); nothing was executed"
        )
    if "zip archive" in text or "central directory" in text:
        return "the archive is truncated or corrupt (cannot read the zip central directory)"
    if isinstance(e, EOFError):
        return "the file ends early (truncated)"
    detail = next((ln for ln in reversed(lines) if "documentation" not in ln and "file an issue" not in ln), "")
    return f"not a readable PyTorch checkpoint ({type(e).__name__}: {detail[:160]})"


def load_official(path: str | os.PathLike, model_type: Any = "auto") -> Tuple[SamConfig, Dict[str, Any]]:
    """Reads and converts an official `.pth`: (SamConfig, nested numpy params)."""
    return convert_state_dict(read_pth(path), model_type)
