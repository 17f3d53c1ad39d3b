"""Automatic mask generation (the official `SamAutomaticMaskGenerator`) on jit-compiled JAX.

gen = SamAutomaticMaskGenerator(model, params)          # official arguments and defaults
records = gen.generate(image)                           # list of official records
records = gen.generate_from_embedding(emb, (H, W))      # reuse an embedding (no crops)
per_image = gen.generate_batch([im1, im2, ...])         # images spread over the devices
"""

from .generator import OUTPUT_MODES, SamAutomaticMaskGenerator
from .geometry import build_all_layer_point_grids, build_point_grid, generate_crop_boxes
from .masks import area_from_rle, coco_encode_rle, mask_to_rle, remove_small_regions, rle_to_mask

__all__ = [
    "OUTPUT_MODES",
    "SamAutomaticMaskGenerator",
    "area_from_rle",
    "build_all_layer_point_grids",
    "build_point_grid",
    "coco_encode_rle",
    "generate_crop_boxes",
    "mask_to_rle",
    "remove_small_regions",
    "rle_to_mask",
]
