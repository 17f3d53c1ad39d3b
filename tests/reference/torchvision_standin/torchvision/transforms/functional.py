"""resize / to_pil_image for PIL images, as torchvision does them."""

import numpy as np
from PIL import Image


def to_pil_image(pic, mode=None):
    arr = np.asarray(pic)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return Image.fromarray(arr, mode=mode)


def resize(img, size, interpolation=None, max_size=None, antialias=True):
    if not isinstance(img, Image.Image):
        raise TypeError("this stand-in only resizes PIL images")
    if isinstance(size, int):
        raise TypeError("this stand-in needs size as (h, w)")
    h, w = size
    return img.resize((int(w), int(h)), Image.BILINEAR)
