"""Image files of any bit depth as 8-bit RGB, the one way every reader of image folders decodes them.

PIL's ``convert("RGB")`` clips the 16-bit greyscale modes (``I;16*``, and ``I`` as 16-bit PNGs open) at 255
instead of scaling them, so every mid-grey pixel of such a file reads as white; here they are scaled by
255 / 65535. Floating-point images (mode ``F``) carry no agreed range and are refused. A photo's EXIF orientation
is applied, as every viewer does (a camera's portrait shot is stored sideways with an orientation tag: read raw,
its face lies on its side). An image above PIL's decompression-bomb limit is a ValueError like any unreadable file.
"""
from contextlib import contextmanager

import numpy as np
from PIL import Image, ImageOps

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@contextmanager
def open_image(path):
    """``PIL.Image.open`` whose refusal of a huge image (DecompressionBombError, neither OSError nor ValueError)
    comes as a ValueError naming the file, so readers that skip or report unreadable files do so for it too."""
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: {error}") from None
    with image:
        yield image


def to_rgb(image: Image.Image, source="image") -> Image.Image:
    """An 8-bit RGB copy of a PIL image of any mode (16-bit greyscale scaled, alpha and palettes as PIL does),
    upright by its EXIF orientation."""
    image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.rint(grey.clip(0, 255)).astype(np.uint8)).convert("RGB")  # 2-D uint8: mode L
    if image.mode == "F":
        raise ValueError(f"{source}: a floating-point image (PIL mode F) has no agreed value range; save it with "
                         "8 or 16 bits per channel")
    return image.convert("RGB")


def read_rgb(path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 255] from an image file (`to_rgb`)."""
    with open_image(path) as image:
        return np.asarray(to_rgb(image, path), dtype=np.float32)
