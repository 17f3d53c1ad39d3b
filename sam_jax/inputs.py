"""Host-side checking and coercion of what users pass to `SamPredictor` (images and prompts).

Every check raises ValueError or TypeError naming the argument and what was expected; nothing
here uses `assert`. Coordinates are pixels of the ORIGINAL image, (x, y), in the continuous frame
where the image covers [0, W] x [0, H] (so x == W is the right edge, still inside).
Python lists are accepted wherever arrays are.
"""

from __future__ import annotations

import warnings
from typing import Any, BinaryIO, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageOps

from .modeling import PAD_LABEL

IMAGE_FORMATS = ("RGB", "BGR")
# Official labels: 1 foreground, 0 background, -1 the "not a point" token (takes part in attention).
POINT_LABELS = (1, 0, -1)


def as_rgb_uint8(image: Any, image_format: str = "RGB", name: str = "image") -> np.ndarray:
    """An image as uint8 (H, W, 3) RGB.

    Accepts HWC arrays (or nested lists) of uint8 in 0..255 or float in [0, 1]; floats become
    round(x * 255). Other integer types are accepted when their values lie in 0..255. Grayscale
    (H, W) or (H, W, 1) is replicated to three channels, a fourth (alpha) channel is dropped.
    A PIL image is converted by its mode, as `pil_to_rgb_uint8` says (a palette applied, CMYK
    converted, 16-bit and float pixels scaled).
    `image_format` is "RGB" or "BGR" (exactly; case matters): the channel order of the pixels.
    Float images are converted a band of rows at a time, so the conversion needs little more
    memory than its uint8 result.
    """
    if not isinstance(image_format, str) or image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be 'RGB' or 'BGR' (case matters), got {image_format!r}")
    if isinstance(image, Image.Image):
        image = pil_to_rgb_uint8(image, name)
    elif not isinstance(image, np.ndarray):
        try:
            image = np.asarray(image)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"{name} must be an (H, W, 3) array; could not make an array: {e}") from None
    if not (np.issubdtype(image.dtype, np.floating) or np.issubdtype(image.dtype, np.integer)):
        raise TypeError(f"{name} must be uint8 (0..255) or float (0..1), got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3:
        raise ValueError(f"{name} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}")
    if image.shape[2] not in (1, 3, 4):
        if image.shape[0] in (1, 3, 4):
            raise ValueError(
                f"{name} looks channels-first (CHW, shape {image.shape}); pass HWC, e.g. image.transpose(1, 2, 0)"
            )
        raise ValueError(f"{name} must have 1, 3 or 4 channels (HWC), got shape {image.shape}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    image = image[:, :, :3]  # a view: alpha is dropped before any pixel is converted
    if np.issubdtype(image.dtype, np.floating):
        image = _unit_float_to_uint8(image, name, "pass uint8 for 0..255 pixels")
    elif image.dtype != np.uint8:  # other integers, e.g. a Python list of ints
        lo, hi = image.min(), image.max()
        if lo < 0 or hi > 255:
            raise ValueError(f"integer {name} must lie in 0..255 (got values in [{lo}, {hi}])")
        image = image.astype(np.uint8)
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    if image_format == "BGR":
        image = image[:, :, ::-1]
    return np.ascontiguousarray(image)


# Pillow modes of 8-bit channels that Pillow itself turns into RGB: "P"/"PA" apply their palette,
# "CMYK", "YCbCr", "LAB" and "HSV" are converted (not reinterpreted), "RGBa"/"La" un-premultiply.
_PILLOW_CONVERTS = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV"}
)
# 16-bit grayscale; "I" (32-bit integers) is how older Pillow reads 16-bit PNGs.
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def open_displayed(source: Union[str, BinaryIO], check_size: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """An image file (a path or a binary stream) as displayed: uint8 (H, W, 3) RGB with its EXIF
    orientation applied, the pixels converted by `pil_to_rgb_uint8`. `check_size(width, height)`
    runs on the header's size before anything is decoded (it raises to refuse). Pillow's guard
    against decompression bombs stays as Pillow draws it: more than twice
    `PIL.Image.MAX_IMAGE_PIXELS` raises `DecompressionBombError`; between the limit and twice it
    the image is read, without Pillow's warning (100-megapixel photos are real). Pillow's own
    errors pass through."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(source) as im:
            if check_size is not None:
                check_size(*im.size)
            return pil_to_rgb_uint8(ImageOps.exif_transpose(im))


def pil_to_rgb_uint8(image: Image.Image, name: str = "image") -> np.ndarray:
    """A PIL image as uint8 (H, W, 3) RGB: the one place sam_jax turns a PIL image into pixels
    (`SamPredictor.set_image` and the command line's image reader both come here).

    By mode: 8-bit modes ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "La", "CMYK",
    "YCbCr", "LAB", "HSV") are converted by Pillow: a palette is applied, CMYK / YCbCr / LAB / HSV
    become RGB (Pillow's formulas, no colour management), grayscale is replicated, and an alpha
    channel is dropped (the colour kept, not composited over a background). 16-bit grayscale
    ("I;16", "I;16B", ...; and "I", in which older Pillow reads 16-bit PNGs) maps 0..65535
    linearly onto 0..255, round(v / 257); "I" values outside 0..65535 are refused. Float ("F",
    e.g. a float TIFF) follows the rule of float arrays: values in [0, 1] become round(v * 255);
    others are refused, since a file does not say what range its floats mean. Any other mode is
    refused. Raises ValueError naming `name` and the mode.
    """
    mode = image.mode
    if image.width == 0 or image.height == 0:
        raise ValueError(f"{name} is empty ({image.width}x{image.height} pixels, mode {mode!r})")
    if mode in _PILLOW_CONVERTS:
        if mode in ("P", "PA"):
            image = image.convert("RGBA")  # also applies a palette's transparency without a warning
        elif mode == "La":
            image = image.convert("LA")  # Pillow has no direct La -> RGB
        return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))
    if mode in _SIXTEEN_BIT:
        gray = np.asarray(image)
        lo, hi = gray.min(), gray.max()
        if lo < 0 or hi > 65535:
            raise ValueError(
                f"{name} in Pillow mode {mode!r} is read as 16-bit (0..65535) but holds values in [{lo}, {hi}]"
            )
        gray = gray.astype(np.uint32)
        gray += 128
        gray //= 257  # round(v / 257): exact in integers, 257 being odd leaves no ties
        gray = gray.astype(np.uint8)
    elif mode == "F":
        gray = _unit_float_to_uint8(np.asarray(image), name, "float pixels are read as 0..1: rescale them first")
    else:
        raise ValueError(
            f"{name} has Pillow mode {mode!r}, which sam_jax does not read; convert it first, e.g. image.convert('RGB')"
        )
    return np.repeat(gray[:, :, None], 3, axis=2)


# Elements of a float image converted at a time: bounds the float64 scratch (2 MiB) whatever the
# image's size, where converting it whole took four times the image's own memory.
_FLOAT_BAND = 1 << 18


def _unit_float_to_uint8(image: np.ndarray, name: str, hint: str) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8 round(x * 255) (half to even, in float64, as numpy rounds),
    a band of rows at a time. NaN, inf or values outside [0, 1] raise ValueError."""
    lo, hi = image.min(), image.max()  # NaN propagates through both, inf shows as an extreme
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"{name} contains NaN or inf")
    if lo < 0.0 or hi > 1.0:
        raise ValueError(f"float {name} must lie in [0, 1] (got values in [{lo:g}, {hi:g}]); {hint}")
    out = np.empty(image.shape, np.uint8)
    rows = max(1, _FLOAT_BAND // image[0].size)
    scratch = np.empty((min(rows, image.shape[0]), *image.shape[1:]), np.float64)
    for r in range(0, image.shape[0], rows):
        band = scratch[: min(rows, image.shape[0] - r)]
        np.multiply(image[r : r + rows], 255.0, out=band, dtype=np.float64)
        np.rint(band, out=band)
        out[r : r + rows] = band
    return out


def _float_array(x: Any, name: str) -> np.ndarray:
    try:
        arr = np.asarray(x)
    except ValueError as e:
        raise ValueError(f"{name} could not be made an array: {e}") from None
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{name} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf")
    return arr


def _check_inside(xy: np.ndarray, size: Tuple[int, int], name: str) -> None:
    """xy (..., 2) must lie in [0, W] x [0, H]."""
    h, w = size
    bad = (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
    if np.any(bad):
        first = xy[bad][0]
        raise ValueError(
            f"{name} has a point outside the {w}x{h} (W x H) image: (x, y) = "
            f"({first[0]:g}, {first[1]:g}); coordinates are original-image pixels"
        )


def check_labels(labels: Any, n: int, name: str = "point_labels", allowed: Sequence[int] = POINT_LABELS) -> np.ndarray:
    """Labels (N,) as int32; integer (or bool) values from `allowed` only."""
    try:
        arr = np.asarray(labels)
    except ValueError as e:
        raise ValueError(f"{name} could not be made an array: {e}") from None
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        raise TypeError(f"{name} must be integers (1 foreground, 0 background), got dtype {arr.dtype}")
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), one label per point, got {arr.shape}")
    bad = ~np.isin(arr.astype(np.int64), list(allowed))
    if np.any(bad):
        raise ValueError(
            f"{name} must be one of {sorted(set(allowed), reverse=True)} "
            f"(1 foreground, 0 background), got {arr[bad][0]!r}"
        )
    return arr.astype(np.int32)


def check_points(
    coords: Any, labels: Any, size: Tuple[int, int], allowed: Sequence[int] = POINT_LABELS
) -> Tuple[np.ndarray, np.ndarray]:
    """One prompt's points: coords (N, 2) as (x, y) original-image pixels and labels (N,).

    Returns (coords float64 (N, 2), labels int32 (N,)). Slots labelled PAD_LABEL (when allowed)
    are not checked against the image bounds: they are ignored by the model.
    """
    if coords is None or labels is None:
        given, missing = ("point_coords", "point_labels") if labels is None else ("point_labels", "point_coords")
        raise ValueError(f"{missing} must be given together with {given}")
    xy = _float_array(coords, "point_coords")
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise ValueError(f"point_coords must have shape (N, 2) as (x, y) pixels, got {xy.shape}")
    lab = check_labels(labels, xy.shape[0], allowed=allowed)
    _check_inside(xy[lab != PAD_LABEL], size, "point_coords")
    return xy, lab


def check_box(box: Any, size: Tuple[int, int], name: str = "box") -> np.ndarray:
    """A box (4,) or (1, 4) as (x0, y0, x1, y1) original-image pixels -> float64 (4,)."""
    arr = _float_array(box, name)
    if arr.shape not in ((4,), (1, 4)):
        raise ValueError(f"{name} must have length 4 as (x0, y0, x1, y1), got shape {arr.shape}")
    return check_boxes(arr.reshape(1, 4), size, name)[0]


def check_boxes(boxes: Any, size: Tuple[int, int], name: str = "boxes") -> np.ndarray:
    """Boxes (B, 4) as (x0, y0, x1, y1) original-image pixels -> float64 (B, 4)."""
    arr = _float_array(boxes, name)
    if arr.ndim != 2 or arr.shape[1] != 4 or arr.shape[0] == 0:
        raise ValueError(f"{name} must have shape (B, 4) as (x0, y0, x1, y1) with B >= 1, got {arr.shape}")
    flipped = (arr[:, 2] < arr[:, 0]) | (arr[:, 3] < arr[:, 1])
    if np.any(flipped):
        i = int(np.argmax(flipped))
        raise ValueError(
            f"{name}[{i}] = {arr[i].tolist()} has x1 < x0 or y1 < y0; boxes are "
            "(x0, y0, x1, y1) with the top-left corner first"
        )
    _check_inside(arr.reshape(-1, 2, 2), size, name)
    return arr


def check_mask_input(mask_input: Any, expected: Tuple[Optional[int], ...], name: str = "mask_input") -> np.ndarray:
    """Low-res mask LOGITS of the `expected` shape (None: any size >= 1 on that axis) -> float32."""
    arr = _float_array(mask_input, name)
    fits = arr.ndim == len(expected) and all((e is None and d >= 1) or d == e for d, e in zip(arr.shape, expected))
    if not fits:
        want = "(" + ", ".join("B" if e is None else str(e) for e in expected) + ")"
        raise ValueError(
            f"{name} must have shape {want}: low-resolution mask LOGITS, such as the "
            f"third output (low_res_logits) of a previous call; got {arr.shape}"
        )
    return arr.astype(np.float32)


def check_flag(value: Any, name: str) -> bool:
    """A real boolean (Python or numpy), not a truthy object."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_batch_points(coords: Any, labels: Any, size: Tuple[int, int]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Points of B prompts: arrays (B, N, 2) and (B, N), or sequences of B per-prompt arrays
    (N_i, 2) and (N_i,) (ragged). PAD_LABEL marks ignored slots. Returns B (coords, labels) pairs."""
    if (coords is None) != (labels is None):
        given, missing = ("point_coords", "point_labels") if labels is None else ("point_labels", "point_coords")
        raise ValueError(f"{missing} must be given together with {given}")
    allowed = (*POINT_LABELS, PAD_LABEL)
    if isinstance(coords, (list, tuple)) and isinstance(labels, (list, tuple)):
        if len(coords) != len(labels):
            raise ValueError(f"point_coords has {len(coords)} prompts but point_labels has {len(labels)}")
        pairs = list(zip(coords, labels))
    else:
        xy = _float_array(coords, "point_coords")
        if xy.ndim != 3 or xy.shape[2] != 2:
            raise ValueError(
                f"point_coords must have shape (B, N, 2) (or be a list of (N_i, 2) arrays), got {xy.shape}"
            )
        try:
            lab = np.asarray(labels)
        except ValueError as e:
            raise ValueError(f"point_labels could not be made an array: {e}") from None
        if lab.shape != xy.shape[:2]:
            raise ValueError(f"point_labels must have shape {xy.shape[:2]} (B, N), got {lab.shape}")
        pairs = list(zip(xy, lab))
    if not pairs:
        raise ValueError("point_coords holds no prompts (B = 0)")
    out = []
    for i, (c, lab) in enumerate(pairs):
        try:
            out.append(check_points(c, lab, size, allowed))
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None
    return out
