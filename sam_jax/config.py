"""Model configurations: the official presets (SAM's vit_b / vit_l / vit_h, MobileSAM, SAM-HQ) and tiny
ones for tests."""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Dict, Iterable, List, Mapping, Tuple, Union

import numpy as np

# Pixel statistics of the official model (RGB, 0..255). The one place they live.
PIXEL_MEAN: Tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: Tuple[float, float, float] = (58.395, 57.12, 57.375)

# Image encoder families (`SamConfig.encoder_type`): SAM's ViT and MobileSAM's TinyViT.
ENCODER_TYPES = ("vit", "tiny_vit")


@dataclasses.dataclass(frozen=True)
class SamConfig:
    """Hyper-parameters of a SAM model.

    Args:
      encoder_embed_dim (int): ViT width (768 / 1024 / 1280 for vit_b / vit_l / vit_h).
      encoder_depth (int): number of ViT blocks.
      encoder_num_heads (int): attention heads per ViT block.
      encoder_global_attn_indexes (tuple[int, ...]): blocks with global (not windowed) attention.
      image_size (int): side of the square, padded encoder input (1024 for the official models).
      patch_size (int): ViT patch size; the embedding grid is image_size // patch_size.
      window_size (int): side of the attention windows of the windowed blocks.
      mlp_ratio (float): ViT MLP hidden width / embed dim.
      prompt_embed_dim (int): width of the image embedding and of every prompt token.
      mask_in_chans (int): hidden channels of the mask-prompt downscaling path.
      decoder_depth (int): blocks of the two-way transformer.
      decoder_mlp_dim (int): MLP width of the two-way transformer.
      decoder_num_heads (int): attention heads of the two-way transformer.
      num_multimask_outputs (int): masks predicted when disambiguating (3).
      iou_head_depth (int): layers of the IoU prediction MLP.
      iou_head_hidden_dim (int): hidden width of the IoU prediction MLP.
      encoder_type (str): the image encoder's family: "vit" (SAM's ViT, the `encoder_*`,
        `patch_size`, `window_size` and `mlp_ratio` fields) or "tiny_vit" (MobileSAM's TinyViT,
        the `tiny_vit_*` fields and `mlp_ratio`; its grid is image_size / 16, so patch_size must
        be 16). The other family's fields are not read (they keep their defaults).
      tiny_vit_embed_dims, tiny_vit_depths, tiny_vit_num_heads, tiny_vit_window_sizes (tuple[int,
        ...]): TinyViT's four stages (width, blocks, heads, attention window); stage 0 is
        convolutional (its heads and window are unused, as in MobileSAM). A merge into a width of
        `modeling.tiny_vit.MERGE_STRIDE_1_DIMS` keeps the grid, any other halves it; the encoder
        checks that the result is image_size / 16.
      hq (bool): SAM-HQ: SAM's model (frozen, as published) plus its HQ output token and the fusion
        of the ViT's tokens after its first global-attention block into the mask features
        (`modeling.mask_decoder.MaskDecoder`'s `hq`). One mask per prompt. Needs a "vit" encoder
        with a global block.
    """

    encoder_embed_dim: int = 1280
    encoder_depth: int = 32
    encoder_num_heads: int = 16
    encoder_global_attn_indexes: Tuple[int, ...] = (7, 15, 23, 31)
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    mlp_ratio: float = 4.0
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    encoder_type: str = "vit"
    tiny_vit_embed_dims: Tuple[int, ...] = (64, 128, 160, 320)
    tiny_vit_depths: Tuple[int, ...] = (2, 2, 6, 2)
    tiny_vit_num_heads: Tuple[int, ...] = (2, 4, 5, 10)
    tiny_vit_window_sizes: Tuple[int, ...] = (7, 7, 14, 7)
    hq: bool = False

    def __post_init__(self) -> None:
        problems = self._normalise_fields()
        if not problems:  # the relations below need fields of the right type and sign
            if self.image_size % self.patch_size:
                problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
            if self.encoder_embed_dim % self.encoder_num_heads:
                problems.append("encoder_embed_dim must be divisible by encoder_num_heads")
            if any(not 0 <= i < self.encoder_depth for i in self.encoder_global_attn_indexes):
                problems.append("encoder_global_attn_indexes must lie in [0, encoder_depth)")
            if int(self.encoder_embed_dim * self.mlp_ratio) < 1:
                problems.append("encoder_embed_dim * mlp_ratio (the ViT MLP width) must be at least 1")
            if (self.prompt_embed_dim // 2) % self.decoder_num_heads:
                problems.append("prompt_embed_dim // 2 must be divisible by decoder_num_heads")
            if self.prompt_embed_dim % 8 or self.mask_in_chans % 4:
                problems.append("prompt_embed_dim must be a multiple of 8 and mask_in_chans of 4")
            if self.encoder_type == "tiny_vit":
                problems += self._tiny_vit_problems()
            if self.hq and (self.encoder_type != "vit" or not self.encoder_global_attn_indexes):
                problems.append("hq (SAM-HQ) needs a 'vit' encoder with a global-attention block")
        if problems:
            raise ValueError("invalid SamConfig: " + "; ".join(problems))

    def _tiny_vit_problems(self) -> List[str]:
        problems = []
        if self.patch_size != 16:
            problems.append(f"a tiny_vit encoder reduces the image 16x: patch_size must be 16, got {self.patch_size}")
        stages = [self.tiny_vit_embed_dims, self.tiny_vit_depths, self.tiny_vit_num_heads, self.tiny_vit_window_sizes]
        if len({len(t) for t in stages}) != 1:
            problems.append("tiny_vit_embed_dims, _depths, _num_heads and _window_sizes need one entry per stage")
        elif any(d % h for d, h in zip(self.tiny_vit_embed_dims[1:], self.tiny_vit_num_heads[1:])):
            problems.append(
                "each tiny_vit_embed_dims entry (after stage 0) must be divisible by its tiny_vit_num_heads"
            )
        return problems

    def _normalise_fields(self) -> List[str]:
        """Checks each field's type and sign, and stores it as the plain Python type (an int, a
        float, a tuple of ints: what `to_json` writes and `==` compares). Returns the problems, each
        naming its field. Sizes are integers of at least 1 (the converter reads head and MLP sizes
        off block 0, so even `encoder_depth` cannot be 0); a bool or a float is not an integer."""
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "encoder_global_attn_indexes" or f.name.startswith("tiny_vit_"):
                # Block indexes and stage depths may be 0; the other stage fields are sizes.
                least = 0 if f.name in ("encoder_global_attn_indexes", "tiny_vit_depths") else 1
                ok = isinstance(value, Iterable) and not isinstance(value, (str, bytes, Mapping))
                items = tuple(value) if ok else ()
                ok = ok and all(_is_int(i) and i >= least for i in items)
                ok = ok and (bool(items) or f.name == "encoder_global_attn_indexes")
                normal: Any = tuple(int(i) for i in items)
                expected = {
                    "encoder_global_attn_indexes": "a list of block indexes",
                    "tiny_vit_depths": "a non-empty list of block counts (0 or more)",
                }.get(f.name, "a non-empty list of positive integers")
            elif f.name == "hq":
                ok = isinstance(value, (bool, np.bool_))
                normal, expected = bool(value) if ok else None, "True or False"
            elif f.name == "encoder_type":
                ok = value in ENCODER_TYPES
                normal, expected = value, f"one of {ENCODER_TYPES}"
            elif f.name == "mlp_ratio":
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                ok = ok and value > 0
                normal, expected = float(value) if ok else None, "a positive number"
            else:
                ok = _is_int(value) and value >= 1
                normal, expected = int(value) if ok else None, "a positive integer"
            if ok:
                object.__setattr__(self, f.name, normal)
            else:
                problems.append(f"{f.name} must be {expected}, got {value!r:.60}")
        return problems

    @property
    def embedding_size(self) -> int:
        """Side of the image-embedding grid (64 for the official models)."""
        return self.image_size // self.patch_size

    @property
    def mask_input_size(self) -> int:
        """Side of the low-resolution mask logits and of `mask_input` (256 officially)."""
        return 4 * self.embedding_size

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SamConfig":
        """The inverse of `to_dict` (fields left out take their defaults). Raises ValueError, one
        line naming each field at fault, for anything else: not a mapping, unknown fields, a
        field of the wrong type or size."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a SamConfig is a mapping of its fields, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise ValueError(f"unknown SamConfig fields: {unknown}")
        return cls(**d)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


PRESETS: Dict[str, SamConfig] = {
    "vit_h": SamConfig(),
    "vit_l": SamConfig(
        encoder_embed_dim=1024,
        encoder_depth=24,
        encoder_num_heads=16,
        encoder_global_attn_indexes=(5, 11, 17, 23),
    ),
    "vit_b": SamConfig(
        encoder_embed_dim=768,
        encoder_depth=12,
        encoder_num_heads=12,
        encoder_global_attn_indexes=(2, 5, 8, 11),
    ),
    # Odd sizes on purpose: a 10x10 embedding grid that windows of 4 must pad to 12, head dims
    # that are not powers of two, a non-default decoder width. Builds and runs in well under a second.
    "tiny": SamConfig(
        encoder_embed_dim=48,
        encoder_depth=3,
        encoder_num_heads=3,
        encoder_global_attn_indexes=(1,),
        image_size=160,
        patch_size=16,
        window_size=4,
        prompt_embed_dim=48,
        mask_in_chans=8,
        decoder_depth=2,
        decoder_mlp_dim=40,
        iou_head_hidden_dim=24,
    ),
    # MobileSAM: TinyViT (~5.7 M parameters, distilled from vit_h's encoder) with SAM's own prompt
    # encoder and mask decoder; MobileSAM's registry calls it "vit_t".
    "mobile_sam": SamConfig(encoder_type="tiny_vit"),
    # MobileSAM's layout with narrow stages and a narrow decoder MLP: 1024 pixels and a 256-wide
    # neck, as MobileSAM's reference TinyViT has no other; one block a stage (the last, 320 wide,
    # keeps the 64 x 64 grid), windows that pad the grids differently. Stage 0's heads and window
    # are MobileSAM's (unused, and what the converter assumes: no tensor records them).
    "tiny_mobile_sam": SamConfig(
        encoder_type="tiny_vit",
        tiny_vit_embed_dims=(8, 16, 24, 320),
        tiny_vit_depths=(1, 1, 1, 1),
        tiny_vit_num_heads=(2, 2, 3, 5),
        tiny_vit_window_sizes=(7, 6, 9, 7),
        mask_in_chans=8,
        decoder_mlp_dim=40,
        iou_head_hidden_dim=24,
    ),
}
# SAM-HQ (its checkpoints sam_hq_vit_b / l / h.pth): SAM's sizes with the HQ additions.
for _size in ("vit_b", "vit_l", "vit_h"):
    PRESETS[f"sam_hq_{_size}"] = dataclasses.replace(PRESETS[_size], hq=True)
PRESETS["tiny_hq"] = dataclasses.replace(PRESETS["tiny"], hq=True)

# Other names of the same models: they are never what `preset_name` answers.
ALIASES = {"default": "vit_h", "vit_t": "mobile_sam"}
PRESETS.update({alias: PRESETS[name] for alias, name in ALIASES.items()})

ConfigLike = Union[str, SamConfig]


def get_config(config: ConfigLike) -> SamConfig:
    """Returns the SamConfig for a preset name or passes a SamConfig through."""
    if isinstance(config, SamConfig):
        return config
    if isinstance(config, str):
        if config not in PRESETS:
            raise ValueError(f"unknown model type {config!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[config]
    raise TypeError(f"config must be a preset name or a SamConfig, got {type(config).__name__}")


def preset_name(config: SamConfig) -> str | None:
    """The preset name equal to `config` (vit_h rather than its alias 'default'), or None."""
    for name, preset in PRESETS.items():
        if name not in ALIASES and preset == config:
            return name
    return None
