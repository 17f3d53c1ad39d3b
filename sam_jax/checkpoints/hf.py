"""Hugging Face transformers `SamModel` / `SamHQModel` weights <-> the official SAM / SAM-HQ state_dict.

HF holds the official tensors in the official layouts (no transposes; qkv stays fused) under other
names, so this module only renames: HF -> official, then `official.convert_state_dict`
applies the one set of layout and strictness rules (SAM-HQ told by its output token, as in an
official `.pth`); for export, `export_state_dict` then official -> HF. Names are a table of module
paths (below); leaves (weight, bias, rel_pos_h, ...) are kept. config.json's `model_type` is "sam"
or "sam_hq". Needs safetensors and json only, never transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from .._atomic import atomic_file
from ..build import build_sam
from ..config import SamConfig, get_config
from .errors import ConversionError, printable
from .native import write_safetensors
from .official import _to_numpy, convert_state_dict, describe, detect_config, export_state_dict, fit_error
from .params import check_params

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# The (2, C/2) gaussian matrix of the random-Fourier positional encoding. SamModel ties two names
# to it; save_pretrained writes the first, older files hold both (they must then be equal).
PE_OFFICIAL = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
PE_HF = "shared_image_embedding.positional_embedding"
PE_HF_TIED = "prompt_encoder.shared_embedding.positional_embedding"

_ATTN = "(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_PROJ = "(q_proj|k_proj|v_proj|out_proj)"
_T = "mask_decoder.transformer"
# Module paths, official <-> HF. "*" is a list index and "(a|b)" a set of names, both kept as they
# are. Every template is literal otherwise, so a path matches at most one row.
MODULES: Tuple[Tuple[str, str], ...] = (
    ("image_encoder", "vision_encoder"),
    ("image_encoder.patch_embed.proj", "vision_encoder.patch_embed.projection"),
    ("image_encoder.blocks.*.norm(1|2)", "vision_encoder.layers.*.layer_norm(1|2)"),
    ("image_encoder.blocks.*.attn", "vision_encoder.layers.*.attn"),
    ("image_encoder.blocks.*.attn.(qkv|proj)", "vision_encoder.layers.*.attn.(qkv|proj)"),
    ("image_encoder.blocks.*.mlp.(lin1|lin2)", "vision_encoder.layers.*.mlp.(lin1|lin2)"),
    ("image_encoder.neck.0", "vision_encoder.neck.conv1"),
    ("image_encoder.neck.1", "vision_encoder.neck.layer_norm1"),
    ("image_encoder.neck.2", "vision_encoder.neck.conv2"),
    ("image_encoder.neck.3", "vision_encoder.neck.layer_norm2"),
    ("prompt_encoder.point_embeddings.*", "prompt_encoder.point_embed.*"),
    ("prompt_encoder.(not_a_point_embed|no_mask_embed)", "prompt_encoder.(not_a_point_embed|no_mask_embed)"),
    ("prompt_encoder.mask_downscaling.0", "prompt_encoder.mask_embed.conv1"),
    ("prompt_encoder.mask_downscaling.1", "prompt_encoder.mask_embed.layer_norm1"),
    ("prompt_encoder.mask_downscaling.3", "prompt_encoder.mask_embed.conv2"),
    ("prompt_encoder.mask_downscaling.4", "prompt_encoder.mask_embed.layer_norm2"),
    ("prompt_encoder.mask_downscaling.6", "prompt_encoder.mask_embed.conv3"),
    ("mask_decoder.(iou_token|mask_tokens)", "mask_decoder.(iou_token|mask_tokens)"),
    (f"{_T}.layers.*.{_ATTN}.{_PROJ}", f"{_T}.layers.*.{_ATTN}.{_PROJ}"),
    (f"{_T}.layers.*.norm(1|2|3|4)", f"{_T}.layers.*.layer_norm(1|2|3|4)"),
    (f"{_T}.layers.*.mlp.(lin1|lin2)", f"{_T}.layers.*.mlp.(lin1|lin2)"),
    (f"{_T}.final_attn_token_to_image.{_PROJ}", f"{_T}.final_attn_token_to_image.{_PROJ}"),
    (f"{_T}.norm_final_attn", f"{_T}.layer_norm_final_attn"),
    ("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1"),
    ("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm"),
    ("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2"),
    # SAM-HQ's decoder additions (SamHQModel); its MLP hf_mlp is hq_mask_mlp (_MLP_HF_NAMES).
    ("mask_decoder.hf_token", "mask_decoder.hq_token"),
    ("mask_decoder.compress_vit_feat.0", "mask_decoder.compress_vit_conv1"),
    ("mask_decoder.compress_vit_feat.1", "mask_decoder.compress_vit_norm"),
    ("mask_decoder.compress_vit_feat.3", "mask_decoder.compress_vit_conv2"),
    ("mask_decoder.embedding_encoder.0", "mask_decoder.encoder_conv1"),
    ("mask_decoder.embedding_encoder.1", "mask_decoder.encoder_norm"),
    ("mask_decoder.embedding_encoder.3", "mask_decoder.encoder_conv2"),
    ("mask_decoder.embedding_maskfeature.0", "mask_decoder.mask_conv1"),
    ("mask_decoder.embedding_maskfeature.1", "mask_decoder.mask_norm"),
    ("mask_decoder.embedding_maskfeature.3", "mask_decoder.mask_conv2"),
)
# MLPs of depth d: official layers.0 .. layers.{d-1} <-> HF proj_in, layers.0 .. layers.{d-3}, proj_out.
# The MLP keeps its path, except SAM-HQ's: official path -> HF path.
_MLP_HF_NAMES = {"mask_decoder.hf_mlp": "mask_decoder.hq_mask_mlp"}
_MLP_OFFICIAL = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|hf_mlp))"
    r"\.layers\.(\d+)"
)
_MLP_HF = re.compile(
    r"(mask_decoder\.(?:output_hypernetworks_mlps\.\d+|iou_prediction_head|hq_mask_mlp))"
    r"\.(proj_in|proj_out|layers\.(\d+))"
)
_MLP_OFFICIAL_NAMES = {h: o for o, h in _MLP_HF_NAMES.items()}


def _shape(value: Any) -> Tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _compile(template: str) -> re.Pattern:
    return re.compile(template.replace(".", r"\.").replace("*", r"(\d+)"))


def _fill(template: str, groups: Tuple[str, ...]) -> str:
    it = iter(groups)
    return re.sub(r"\*|\([^)]*\)", lambda _: next(it), template)


_RULES = {"to_official": [(_compile(h), o) for o, h in MODULES], "to_hf": [(_compile(o), h) for o, h in MODULES]}


def _mlp_depths(keys: Any, hf: bool) -> Dict[str, int]:
    """{official MLP module path: depth} as far as the keys (HF or official names) show it."""
    depths: Dict[str, int] = {}
    for key in keys:
        m = (_MLP_HF if hf else _MLP_OFFICIAL).fullmatch(key.rpartition(".")[0])
        if m:
            d = (int(m.group(3)) + 3 if m.group(3) else 2) if hf else int(m.group(2)) + 1
            mlp = _MLP_OFFICIAL_NAMES.get(m.group(1), m.group(1)) if hf else m.group(1)
            depths[mlp] = max(depths.get(mlp, 2), d)
    return depths


def _rename(key: str, direction: str, depths: Mapping[str, int]) -> Optional[str]:
    """One key renamed ("to_official" or "to_hf"), or None when no rule knows its module."""
    module, _, leaf = key.rpartition(".")
    for pattern, target in _RULES[direction]:
        m = pattern.fullmatch(module)
        if m:
            return f"{_fill(target, m.groups())}.{leaf}"
    m = (_MLP_HF if direction == "to_official" else _MLP_OFFICIAL).fullmatch(module)
    if not m:
        return None
    if direction == "to_official":
        mlp = _MLP_OFFICIAL_NAMES.get(m.group(1), m.group(1))
        d = depths.get(mlp, 3)
        i = 0 if m.group(2) == "proj_in" else d - 1 if m.group(2) == "proj_out" else int(m.group(3)) + 1
        return f"{mlp}.layers.{i}.{leaf}"
    mlp, d, i = m.group(1), depths.get(m.group(1), 3), int(m.group(2))
    name = "proj_in" if i == 0 else "proj_out" if i == d - 1 else f"layers.{i - 1}"
    return f"{_MLP_HF_NAMES.get(mlp, mlp)}.{name}.{leaf}"


def official_to_hf(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Official SAM (SAM-HQ) state_dict -> HF SamModel (SamHQModel) names (values untouched, as
    save_pretrained writes: the positional matrix once, under PE_HF). Raises ConversionError naming
    every unknown key."""
    depths = _mlp_depths(state, hf=False)
    out: Dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        new = PE_HF if key == PE_OFFICIAL else _rename(key, "to_hf", depths)
        if new is None:
            unknown.append(f"unexpected key {printable(key)}")
        else:
            out[new] = value
    if unknown:
        raise ConversionError("keys with no Hugging Face name", unknown)
    return out


def hf_to_official(state: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """HF SamModel or SamHQModel state_dict -> (official names -> same values, problems).

    Problems, each naming its HF key: keys no rule knows, and PE_HF / PE_HF_TIED both present with
    different values. Either copy of the positional matrix alone is accepted.
    """
    depths = _mlp_depths(state, hf=True)
    out: Dict[str, Any] = {}
    problems: List[str] = []
    pes = [k for k in (PE_HF, PE_HF_TIED) if k in state]
    if len(pes) == 2:
        try:
            same = np.array_equal(_to_numpy(state[PE_HF], PE_HF), _to_numpy(state[PE_HF_TIED], PE_HF_TIED))
        except TypeError as e:
            same, problems = True, [str(e)]
        if not same:
            problems.append(
                f"{PE_HF} and {PE_HF_TIED} differ: the positional-encoding matrix is stored twice with different values"
            )
    if pes:
        out[PE_OFFICIAL] = state[pes[0]]
    for key, value in state.items():
        if key in pes:
            continue
        new = _rename(key, "to_official", depths)
        if new is None:
            problems.append(f"unexpected key {printable(key)} {_shape(value)}")
        else:
            out[new] = value
    return out, problems


def is_hf_layout(keys: Any) -> bool:
    """True for HF names, False for official ones; ConversionError when both appear."""
    keys = list(keys)
    hf = [
        k
        for k in keys
        if k in (PE_HF, PE_HF_TIED) or (_rename(k, "to_official", {}) is not None and _rename(k, "to_hf", {}) is None)
    ]
    official = [
        k
        for k in keys
        if k == PE_OFFICIAL or (_rename(k, "to_hf", {}) is not None and _rename(k, "to_official", {}) is None)
    ]
    if hf and official:
        raise ConversionError(
            "the checkpoint mixes Hugging Face and official key names",
            [f"Hugging Face key {hf[0]}", f"official key {official[0]}"],
        )
    return bool(hf)


# ---------------------------------------------------------------------------------------------
# config.json

# transformers' model_type (config.json) of SAM and of SAM-HQ (SamConfig.hq); each sub-config's
# is "{model_type}_vision_model", "{model_type}_prompt_encoder", "{model_type}_mask_decoder".
MODEL_TYPE = {False: "sam", True: "sam_hq"}
ARCHITECTURE = {False: "SamModel", True: "SamHQModel"}

# SamConfig field <-> (HF config section, field, HF default when the field is absent).
FIELDS: Tuple[Tuple[str, str, str, Any], ...] = (
    ("encoder_embed_dim", "vision_config", "hidden_size", 768),
    ("encoder_depth", "vision_config", "num_hidden_layers", 12),
    ("encoder_num_heads", "vision_config", "num_attention_heads", 12),
    ("encoder_global_attn_indexes", "vision_config", "global_attn_indexes", (2, 5, 8, 11)),
    ("image_size", "vision_config", "image_size", 1024),
    ("patch_size", "vision_config", "patch_size", 16),
    ("window_size", "vision_config", "window_size", 14),
    ("mlp_ratio", "vision_config", "mlp_ratio", 4.0),  # mlp_dim / hidden_size wins when given
    ("prompt_embed_dim", "prompt_encoder_config", "hidden_size", 256),
    ("mask_in_chans", "prompt_encoder_config", "mask_input_channels", 16),
    ("decoder_depth", "mask_decoder_config", "num_hidden_layers", 2),
    ("decoder_mlp_dim", "mask_decoder_config", "mlp_dim", 2048),
    ("decoder_num_heads", "mask_decoder_config", "num_attention_heads", 8),
    ("num_multimask_outputs", "mask_decoder_config", "num_multimask_outputs", 3),
    ("iou_head_depth", "mask_decoder_config", "iou_head_depth", 3),
    ("iou_head_hidden_dim", "mask_decoder_config", "iou_head_hidden_dim", 256),
)


def _implied(cfg: SamConfig) -> Tuple[Tuple[str, str, Any, Any], ...]:
    """HF fields a SAM model of `cfg` must have: (section, field, HF default, value)."""
    c = cfg.prompt_embed_dim
    # SAM-HQ: the width of the ViT tokens its decoder compresses. Which tokens is not a field:
    # SamHQModel, like sam_jax and SAM-HQ, takes the output of the first global-attention block.
    hq = (("mask_decoder_config", "vit_dim", 768, cfg.encoder_embed_dim),) if cfg.hq else ()
    return hq + (
        ("vision_config", "mlp_dim", None, int(round(cfg.encoder_embed_dim * cfg.mlp_ratio))),
        ("vision_config", "output_channels", 256, c),
        ("vision_config", "num_pos_feats", 128, c // 2),
        ("vision_config", "num_channels", 3, 3),
        ("vision_config", "qkv_bias", True, True),
        ("vision_config", "use_abs_pos", True, True),
        ("vision_config", "use_rel_pos", True, True),
        ("vision_config", "hidden_act", "gelu", "gelu"),
        ("vision_config", "layer_norm_eps", 1e-6, 1e-6),
        ("prompt_encoder_config", "image_size", 1024, cfg.image_size),
        ("prompt_encoder_config", "patch_size", 16, cfg.patch_size),
        ("prompt_encoder_config", "num_point_embeddings", 4, 4),
        ("prompt_encoder_config", "hidden_act", "gelu", "gelu"),
        ("prompt_encoder_config", "layer_norm_eps", 1e-6, 1e-6),
        ("mask_decoder_config", "hidden_size", 256, c),
        ("mask_decoder_config", "attention_downsample_rate", 2, 2),
        ("mask_decoder_config", "hidden_act", "relu", "relu"),
        # HF uses this eps in the two-way blocks' norm1..4, where the official model has torch's
        # default 1e-5. HF's own conversions wrote 1e-6; sam_jax computes with 1e-5 and reads both.
        ("mask_decoder_config", "layer_norm_eps", 1e-6, 1e-5),
    )


def hf_config(cfg: SamConfig) -> Dict[str, Any]:
    """The config.json of a transformers SamModel (SamHQModel when cfg.hq) equal to a sam_jax
    model of `cfg`."""
    model_type = MODEL_TYPE[cfg.hq]
    sections: Dict[str, Dict[str, Any]] = {
        "vision_config": {"model_type": f"{model_type}_vision_model"},
        "prompt_encoder_config": {"model_type": f"{model_type}_prompt_encoder"},
        "mask_decoder_config": {"model_type": f"{model_type}_mask_decoder"},
    }
    for name, section, field, _ in FIELDS:
        value = getattr(cfg, name)
        sections[section][field] = list(value) if isinstance(value, tuple) else value
    for section, field, _, value in _implied(cfg):
        sections[section][field] = value
    return {
        "architectures": [ARCHITECTURE[cfg.hq]],
        "model_type": model_type,
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        **sections,
    }


def _side(value: Any) -> Any:
    """HF allows image_size / patch_size as a square pair."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        return value[0]
    return value


def config_from_hf(d: Mapping[str, Any], source: str = CONFIG_FILE) -> SamConfig:
    """A transformers SamConfig or SamHQConfig dict (config.json; model_type "sam", the default,
    or "sam_hq") -> SamConfig. Absent fields take HF's defaults. Raises ConversionError naming
    `source` and every field sam_jax cannot represent, by its HF name (`vision_config.hidden_size`)."""
    if not isinstance(d, Mapping):
        raise ConversionError(f"{source}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type", MODEL_TYPE[False])
    if model_type not in MODEL_TYPE.values():
        raise ConversionError(
            f"{source}: model_type {model_type!r:.60} is neither 'sam' nor 'sam_hq' (SAM 2 and others are "
            "different models)"
        )
    sec = {s: d.get(s) or {} for s in ("vision_config", "prompt_encoder_config", "mask_decoder_config")}
    not_objects = [
        f"{s} must be a JSON object, got {type(v).__name__}" for s, v in sec.items() if not isinstance(v, Mapping)
    ]
    if not_objects:
        raise ConversionError(f"{source}: " + "; ".join(not_objects))
    kwargs = {name: _side(sec[s].get(f, default)) for name, s, f, default in FIELDS}
    kwargs["hq"] = model_type == MODEL_TYPE[True]
    mlp_dim = sec["vision_config"].get("mlp_dim")
    if mlp_dim is not None:  # mlp_dim / hidden_size wins over mlp_ratio; SamConfig checks hidden_size
        if not isinstance(mlp_dim, int) or isinstance(mlp_dim, bool) or mlp_dim < 1:
            raise ConversionError(f"{source}: vision_config.mlp_dim must be a positive integer, got {mlp_dim!r:.60}")
        embed = kwargs["encoder_embed_dim"]
        if isinstance(embed, int) and not isinstance(embed, bool) and embed >= 1:
            kwargs["mlp_ratio"] = mlp_dim / embed
    try:
        cfg = SamConfig(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{source}: {_hf_names(str(e).removeprefix('invalid SamConfig: '))}") from None
    problems = [
        f"{s}.{f} is {sec[s].get(f, default)!r}, expected {want!r}"
        for s, f, default, want in _implied(cfg)
        if (s, f) not in {("vision_config", "mlp_dim"), ("mask_decoder_config", "layer_norm_eps")}
        and _side(sec[s].get(f, default)) != want
    ]
    if problems:
        raise ConversionError(f"{source}: not a model sam_jax can represent", problems)
    return cfg


# SamConfig's own errors in config.json's words; its hq is model_type "sam_hq".
_HF_NAME = {name: f"{s}.{f}" for name, s, f, _ in FIELDS} | {"hq": "model_type 'sam_hq'"}
_FIELD_NAME = re.compile(r"\b(" + "|".join(_HF_NAME) + r")\b")


def _hf_names(text: str) -> str:
    """SamConfig field names in `text` -> their config.json names."""
    return _FIELD_NAME.sub(lambda m: _HF_NAME[m.group(1)], text)


# ---------------------------------------------------------------------------------------------
# Files


def read_safetensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """(tensors as numpy, float16 / bfloat16 widened to float32; metadata) of a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            out = {}
            for k in f.keys():
                try:
                    out[k] = f.get_tensor(k)
                except TypeError:  # bfloat16: numpy has no such dtype, jax (ml_dtypes) has
                    with safe_open(path, framework="flax") as g:
                        out[k] = np.asarray(g.get_tensor(k), np.float32)
    except (SafetensorError, OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from None
    return {k: v.astype(np.float32) if v.dtype.name in ("float16", "bfloat16") else v for k, v in out.items()}, meta


def read_hf_folder(folder: str) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, Any]]]:
    """An HF model folder -> (state_dict, config.json dict or None). Reads model.safetensors or
    the shards listed by model.safetensors.index.json."""
    config = None
    if os.path.isfile(os.path.join(folder, CONFIG_FILE)):
        try:
            with open(os.path.join(folder, CONFIG_FILE)) as f:
                config = json.load(f)
        except (OSError, ValueError) as e:
            raise ConversionError(f"{os.path.join(folder, CONFIG_FILE)}: not readable JSON ({e})") from None
        if not isinstance(config, dict):
            raise ConversionError(f"{os.path.join(folder, CONFIG_FILE)}: expected a JSON object")
    single, index = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, INDEX_FILE)
    if os.path.isfile(single):
        return read_safetensors(single)[0], config
    if os.path.isfile(index):
        try:
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            if not all(isinstance(shard, str) for shard in shards):
                raise TypeError("weight_map: file names must be strings")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({e})") from None
        state: Dict[str, np.ndarray] = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(folder, shard))[0])
        return state, config
    found = ", ".join(sorted(os.listdir(folder))[:6]) or "nothing"
    raise ConversionError(f"{folder}: no {WEIGHTS_FILE} in this folder (found {found})")


def convert_hf_state_dict(
    state: Mapping[str, Any],
    model_type: Any = "auto",
    config: Optional[Mapping[str, Any]] = None,
    *,
    config_source: str = CONFIG_FILE,
) -> Tuple[SamConfig, Dict[str, Any]]:
    """HF SamModel or SamHQModel state_dict (numpy or torch) -> (SamConfig, nested Flax params).

    The size comes from the shapes, checked against `config` (a config.json dict, read from
    `config_source`, which its errors name) when given, which also supplies the decoder head count
    that no shape shows. Strict as `convert_state_dict`; every problem names its HF key.
    """
    official, extra = hf_to_official(state)
    depths = _mlp_depths(state, hf=True)
    pe_name = PE_HF_TIED if PE_HF_TIED in state and PE_HF not in state else PE_HF

    def to_hf_text(text: str) -> str:
        def sub(m: re.Match) -> str:
            key = m.group(0)
            return pe_name if key == PE_OFFICIAL else _rename(key, "to_hf", depths) or key

        return re.sub(r"[A-Za-z_]\w*(?:\.\w+)+", sub, text)

    if config is not None:
        cfg = config_from_hf(config, config_source)
        if model_type not in (None, "auto") and get_config(model_type) != cfg:
            name = model_type if isinstance(model_type, str) else "given"
            raise ConversionError(f"model type {name} does not match {config_source}, which describes {describe(cfg)}")
        _check_config_matches(cfg, official, config_source)
        model_type = cfg
    try:
        cfg, params = convert_state_dict(official, model_type)
    except ConversionError as e:
        problems = extra + [to_hf_text(p) for p in e.problems]
        if e.config is not None:
            raise fit_error(e.config, problems) from None
        raise ConversionError(to_hf_text(e.headline), problems) from None
    if extra:
        raise fit_error(cfg, extra)
    return cfg, params


def _check_config_matches(cfg: SamConfig, official: Mapping[str, Any], source: str) -> None:
    try:
        found = detect_config({k: _shape(v) for k, v in official.items()})
    except ConversionError:
        return  # the key-by-key check reports what is missing
    found = dataclasses.replace(found, decoder_num_heads=cfg.decoder_num_heads)  # not in any shape
    names = {**_HF_NAME, "hq": "model_type"}  # hq is told by model_type (its values: MODEL_TYPE)

    def text(field: str, value: Any) -> str:
        return repr(MODEL_TYPE[value]) if field == "hq" else str(value)

    diffs = [
        f"{names.get(f.name, f.name)}: {os.path.basename(source)} says {text(f.name, getattr(cfg, f.name))}, "
        f"the weights {text(f.name, getattr(found, f.name))}"
        for f in dataclasses.fields(cfg)
        if getattr(cfg, f.name) != getattr(found, f.name)
    ]
    if diffs:
        raise ConversionError(f"{source} does not match the weights, which look like {describe(found)}", diffs)


def load_hf(path: str | os.PathLike, model_type: Any = "auto") -> Tuple[SamConfig, Dict[str, Any]]:
    """An HF folder (config.json + model.safetensors) or an HF model.safetensors file ->
    (SamConfig, nested numpy params). A lone file gives shapes only: the decoder head count, which
    no shape shows, is then the official 8."""
    path = os.fspath(path)
    if os.path.isdir(path):
        state, config = read_hf_folder(path)
    elif os.path.isfile(path):
        state, config = read_safetensors(path)[0], None
    else:
        raise ConversionError(f"{path}: no such file or folder")
    return convert_hf_state_dict(state, model_type, config, config_source=os.path.join(path, CONFIG_FILE))


def export_hf(params: Mapping[str, Any], config: SamConfig | str, folder: str | os.PathLike) -> Dict[str, Any]:
    """sam_jax params -> an HF folder (config.json + model.safetensors, float32) that
    `transformers.SamModel.from_pretrained` loads (`SamHQModel` for SAM-HQ: config.hq). Returns
    the HF state_dict written."""
    cfg = get_config(config)
    if cfg.encoder_type != "vit":
        raise ConversionError(
            f"the Hugging Face layout (transformers SamModel, SamHQModel) has SAM's ViT encoder only, not "
            f"{describe(cfg)}; export to an official .pth instead"
        )
    try:
        check_params(params, build_sam(cfg))
    except ValueError as e:
        raise ConversionError(str(e)) from None
    official = export_state_dict(params)
    state = {k: np.ascontiguousarray(v, np.float32) for k, v in official_to_hf(official).items()}
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    weights, cfg_path = os.path.join(folder, WEIGHTS_FILE), os.path.join(folder, CONFIG_FILE)
    write_safetensors(weights, state, {"format": "pt"})  # "pt": what transformers expects
    with atomic_file(cfg_path) as tmp, open(tmp, "w") as f:
        json.dump(hf_config(cfg), f, indent=2, sort_keys=True)
        f.write("\n")
    return state
