"""One image decoder for every step: pre-training, fine-tuning, evaluation and predict.

Every file becomes the same 8-bit RGB picture wherever it is read:

- EXIF orientation is applied (as Detectron2's ``read_image`` does): a phone photo is upright,
  and a COCO record's width and height are checked against the upright size;
- 16- and 32-bit integer images (``I;16`` PNGs, ``I``) are scaled from their range to 0..255,
  not clipped (PIL's own ``convert("RGB")`` turns every value above 255 white); float images
  (``F``) are taken as 0..1 when they lie there, else as 0..255;
- palette, grayscale, bilevel, CMYK and YCbCr images go through PIL's conversion; an alpha
  channel is dropped (the colour under it is kept), as torchvision's and Detectron2's readers do;
- only regular files are opened (a FIFO would block the loader forever), and decompression
  bombs are refused by PIL's own limit.
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height


class UnreadableImageFile(OSError):
    """An image file that cannot be decoded, with the reason."""


def _check_regular(source) -> None:
    if isinstance(source, (str, os.PathLike)) and not stat.S_ISREG(os.stat(source).st_mode):
        raise UnreadableImageFile(f"{source}: not a regular file")


def _to_8bit(im: Image.Image) -> Image.Image:
    """High-bit-depth single-channel images scaled to 8 bits, so convert("RGB") keeps their contrast."""
    if im.mode.startswith("I;16") or im.mode == "I":
        values = np.asarray(im, dtype=np.float64)
        high = 65535.0 if im.mode.startswith("I;16") or values.max(initial=0) <= 65535 else values.max()
        return Image.fromarray(np.clip(values / high * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        values = np.asarray(im, dtype=np.float64)
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L")
    return im


def open_rgb(source: str | os.PathLike | io.BytesIO) -> Image.Image:
    """The file decoded now (truncated data fails here, not in a transform), upright, 8-bit RGB."""
    _check_regular(source)
    with Image.open(source) as im:
        im.load()
        upright = ImageOps.exif_transpose(im)
        return _to_8bit(upright).convert("RGB")


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of the upright image, from the header alone."""
    _check_regular(path)
    with Image.open(path) as im:
        width, height = im.size
        if im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED:
            width, height = height, width
    return width, height


def stored_size_differs(path: str | Path) -> bool:
    """True when the file's EXIF orientation turns it (width and height swap once upright)."""
    try:
        with Image.open(path) as im:
            return im.getexif().get(EXIF_ORIENTATION) in TRANSPOSED
    except Exception:  # noqa: BLE001 - only used to word an error message
        return False
