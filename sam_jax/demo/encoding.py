"""What crosses the wire besides JSON: uploaded image bytes -> pixels, masks -> PNG (base64).

Masks travel as 1-bit PNGs at the image's own size, white = mask with the background transparent
(a tRNS chunk), so the page draws one with a single `drawImage` and the download is that same
file. Measured for a 1200 x 800 image on a 2-core CPU: Pillow encodes one mask in 2 ms (a smooth
mask) to 6 ms (a speckled one) at compress_level 1, against 16 ms at the default level for ~15%
fewer bytes, which the loopback does not need. "Segment everything" sends one palette PNG in
which pixel value k + 1 means record k (larger masks painted first, so smaller ones stay
visible), and the records themselves with COCO RLE segmentations, as `sam-jax amg` writes them.
"""

from __future__ import annotations

import base64
import colorsys
import io
from typing import Any, Dict, List, Tuple

import numpy as np

from ..checkpoints.errors import first_line
from ..inputs import open_displayed
from ..rle import coco_encode_rle, mask_to_rle
from .errors import DemoError


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Uploaded file bytes -> uint8 (H, W, 3) RGB as displayed (EXIF orientation applied), as the
    command line reads an image file (`sam_jax.inputs.pil_to_rgb_uint8` converts the pixels).

    Raises DemoError: 413 for an image of more than `max_pixels` pixels (checked from the header,
    before anything is decoded) or one that Pillow refuses as a decompression bomb (more than
    twice `PIL.Image.MAX_IMAGE_PIXELS`); 400 for bytes that are not an image Pillow reads, a
    truncated or corrupt file, or pixels that cannot be converted.
    """
    from PIL import Image, UnidentifiedImageError

    def check_size(w: int, h: int) -> None:
        if w * h > max_pixels:
            raise DemoError(
                f"the image is {w}x{h} pixels ({w * h / 1e6:.1f} megapixels); this server takes at most "
                f"{max_pixels / 1e6:g} megapixels: make it smaller first",
                status=413,
            )

    try:
        return open_displayed(io.BytesIO(data), check_size)
    except DemoError:
        raise
    except Image.DecompressionBombError as e:
        raise DemoError(f"the image is refused as a possible decompression bomb: {first_line(e)}", status=413) from None
    except UnidentifiedImageError:
        raise DemoError("the file is not an image this server can read (Pillow does not recognise it)") from None
    except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types (OSError, ValueError, ...)
        raise DemoError(f"cannot read the image: {first_line(e)}") from None


def encode_jpeg(image: np.ndarray) -> str:
    """uint8 (H, W, 3) -> base64 JPEG (quality 90): the preview of an image the browser cannot show."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def encode_mask(mask: np.ndarray) -> str:
    """bool (H, W) -> base64 of a 1-bit PNG: white where the mask is, transparent elsewhere."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(mask, bool)).save(buf, format="PNG", compress_level=1, transparency=0)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def palette(n: int) -> List[Tuple[int, int, int]]:
    """n distinct, saturated colours: hues a golden angle apart, two brightness levels alternating."""
    out = []
    for k in range(n):
        r, g, b = colorsys.hsv_to_rgb((k * 0.381966) % 1.0, 0.75, 0.95 if k % 2 == 0 else 0.75)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


# Palette entries 1..255 of the label image; record k is drawn in entry 1 + k % 255.
LABEL_COLOURS = palette(255)


def encode_labels(masks: List[np.ndarray], size: Tuple[int, int]) -> str:
    """Masks bool (H, W) -> base64 of one palette PNG: value 1 + k % 255 where mask k is (the
    larger masks painted first), 0 (transparent) where none is."""
    from PIL import Image

    labels = np.zeros(size, np.uint8)
    for k in sorted(range(len(masks)), key=lambda k: -int(np.count_nonzero(masks[k]))):
        labels[masks[k]] = 1 + k % 255
    im = Image.fromarray(labels)
    im.putpalette([0, 0, 0] + [c for rgb in LABEL_COLOURS for c in rgb])
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=1, transparency=0)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def coco_records(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The generator's binary_mask records with each segmentation as COCO RLE: the records
    `sam-jax amg --output-mode coco_rle` writes (needs pycocotools)."""
    return [{**r, "segmentation": coco_encode_rle(mask_to_rle(r["segmentation"]))} for r in records]
