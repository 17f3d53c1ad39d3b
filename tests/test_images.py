"""Images as users have them: a PIL image of every Pillow mode, 16-bit and float pixels, and the
memory a float image costs. `inputs.pil_to_rgb_uint8` is the one conversion; `SamPredictor.set_image`
and the command line's image reader (tests/cli/test_segment.py) both go through it."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import skimage.data
from PIL import Image

import sam_jax
from sam_jax import SamPredictor
from sam_jax.inputs import as_rgb_uint8

PHOTO = np.ascontiguousarray(skimage.data.chelsea()[::3, ::3])  # 100 x 151 RGB uint8
GRAY = PHOTO[..., 1]
H, W = GRAY.shape


def _rgb(*pixel: int) -> np.ndarray:
    return np.array(pixel, np.uint8).reshape(1, 1, 3)


def _gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _palette_image(mode: str) -> Image.Image:
    """Indices GRAY // 4 into a palette whose entry i is (4i, 255 - 4i, 7): read as gray before."""
    im = Image.frombytes("P", (W, H), (GRAY // 4).tobytes())
    im.putpalette([v for i in range(256) for v in ((4 * i) % 256, 255 - (4 * i) % 256, 7)])
    return im if mode == "P" else im.convert(mode)


def _palette_expected() -> np.ndarray:
    i = (GRAY // 4).astype(np.int64)
    return np.stack([4 * i, 255 - 4 * i, np.full_like(i, 7)], axis=2).astype(np.uint8)


def _with_byte_transparency() -> Image.Image:
    im = _palette_image("P")
    im.info["transparency"] = bytes(range(0, 256, 4))  # as a PNG's tRNS chunk: Pillow warns on convert("RGB")
    return im


ALPHA = (np.arange(H * W).reshape(H, W) % 256).astype(np.uint8)

# mode -> (a PIL image of that mode, the RGB pixels it shows). Colour formulas: CMYK R = 255 - C - K
# (Pillow's, no colour management); YCbCr JFIF full range (R = Y + 1.402 (Cr - 128), ...); HSV with
# the hue in 0..255; LAB, RGBa and La as Pillow converts them (un-premultiplied: 50 * 255 / 128 -> 99).
CASES = {
    "RGB": lambda: (Image.fromarray(PHOTO), PHOTO),
    "RGBA": lambda: (Image.fromarray(np.dstack([PHOTO, ALPHA])), PHOTO),
    "RGBX": lambda: (Image.fromarray(PHOTO).convert("RGBX"), PHOTO),
    "L": lambda: (Image.fromarray(GRAY), _gray3(GRAY)),
    "LA": lambda: (Image.fromarray(np.dstack([GRAY, ALPHA])), _gray3(GRAY)),
    "1": lambda: (Image.fromarray(GRAY > 100), _gray3(np.where(GRAY > 100, 255, 0).astype(np.uint8))),
    "P": lambda: (_palette_image("P"), _palette_expected()),
    "P_transparency_bytes": lambda: (_with_byte_transparency(), _palette_expected()),
    "PA": lambda: (_palette_image("PA"), _palette_expected()),
    "CMYK": lambda: (Image.fromarray(PHOTO).convert("CMYK"), PHOTO),
    "CMYK_magenta_ink": lambda: (Image.new("CMYK", (1, 1), (0, 255, 0, 0)), _rgb(255, 0, 255)),
    "CMYK_black_ink": lambda: (Image.new("CMYK", (1, 1), (0, 0, 0, 255)), _rgb(0, 0, 0)),
    "YCbCr": lambda: (Image.new("YCbCr", (1, 1), (128, 128, 255)), _rgb(255, 37, 128)),
    "YCbCr_blue": lambda: (Image.new("YCbCr", (1, 1), (128, 255, 128)), _rgb(128, 84, 255)),
    "HSV": lambda: (Image.new("HSV", (1, 1), (170, 255, 255)), _rgb(0, 0, 255)),
    "LAB": lambda: (Image.new("LAB", (1, 1), (255, 128, 128)), _rgb(254, 255, 254)),
    "RGBa": lambda: (Image.new("RGBa", (1, 1), (50, 60, 70, 128)), _rgb(99, 119, 139)),
    "La": lambda: (Image.new("La", (1, 1), (100, 128)), _rgb(199, 199, 199)),
    # 16-bit: 0..65535 onto 0..255, round(v / 257): 257 * g -> g exactly, 128 -> 0, 129 -> 1.
    "I;16": lambda: (Image.fromarray(GRAY.astype(np.uint16) * 257), _gray3(GRAY)),
    "I;16_rounding": lambda: (Image.fromarray(np.uint16([[128, 129, 65535]])), _gray3(np.uint8([[0, 1, 255]]))),
    "I;16B": lambda: (Image.fromarray((GRAY.astype(np.uint16) * 257).astype(">u2")), _gray3(GRAY)),
    "I;16L": lambda: (Image.frombytes("I;16L", (W, H), (GRAY.astype("<u2") * 257).tobytes()), _gray3(GRAY)),
    "I;16N": lambda: (Image.frombytes("I;16N", (W, H), (GRAY.astype("=u2") * 257).tobytes()), _gray3(GRAY)),
    "I": lambda: (Image.fromarray(GRAY.astype(np.int32) * 257), _gray3(GRAY)),
    # Float: the rule of float arrays, [0, 1] -> round(v * 255).
    "F": lambda: (Image.fromarray((GRAY / 255.0).astype(np.float32)), _gray3(GRAY)),
}


def test_every_pillow_mode_has_a_case():
    """A mode Pillow adds must be decided on (converted or refused), not found in a bug report."""
    assert set(Image.MODES) <= {case.split("_")[0] for case in CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_pil_image_shows_its_pixels(case):
    im, want = CASES[case]()
    assert im.mode == case.split("_")[0]
    got = as_rgb_uint8(im)
    assert got.dtype == np.uint8 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)


BAD = {
    "I_negative": (lambda: Image.fromarray(np.array([[-1, 5]], np.int32)), "16-bit"),
    "I_above_16_bits": (lambda: Image.fromarray(np.array([[70000, 5]], np.int32)), "16-bit"),
    "F_above_1": (lambda: Image.fromarray(np.array([[0.5, 255.0]], np.float32)), r"\[0, 1\]"),
    "F_negative": (lambda: Image.fromarray(np.array([[-0.5, 1.0]], np.float32)), r"\[0, 1\]"),
    "F_nan": (lambda: Image.fromarray(np.array([[np.nan, 1.0]], np.float32)), "NaN"),
    "F_inf": (lambda: Image.fromarray(np.array([[np.inf, 1.0]], np.float32)), "inf"),
    "F_empty": (lambda: Image.new("F", (0, 3)), "empty"),
    "RGB_empty": (lambda: Image.new("RGB", (4, 0)), "empty"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_pil_image_out_of_range_is_refused(case):
    make, match = BAD[case]
    with pytest.raises(ValueError, match=match):
        as_rgb_uint8(make())


def test_set_image_takes_pil_images(tiny):
    """What a user passes: a GIF-like palette image and a 16-bit scan encode as the pixels they show."""
    pred = SamPredictor(tiny.model, tiny.params, compile_ahead=False)
    for case in ("P", "I;16"):
        im, want = CASES[case]()
        pred.set_image(want)
        ref = pred.get_image_embedding()
        pred.set_image(im)
        assert pred.original_size == (H, W)
        np.testing.assert_array_equal(pred.get_image_embedding(), ref)


def test_float_image_memory():
    """A float image costs about its uint8 result on the host, not 4x itself (a float64 copy and
    its temporaries, before): measured 0.28x (conversion) and 0.37x (with the resize) here."""
    image = np.full((2000, 3000, 3), 0.5, np.float32)  # 69 MiB
    for convert in (lambda: as_rgb_uint8(image), lambda: sam_jax.prepare_images([image], 1024)):
        tracemalloc.start()
        try:
            convert()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 0.5 * image.nbytes
