"""Safe image decoding shared by the shard writer and the read pipeline.

Every PIL mode becomes 8-bit RGB; transparency is composited on white (the convention of
img2dataset and of most caption datasets, where a transparent logo means "on a page").
Decompression bombs are refused before pixels are decoded.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Formats PIL may parse: without a list PIL sniffs every format it knows, so a ".jpg" that is really
# EPS reaches Ghostscript. Shards hold the first; a writer's source folders may also hold the rest.
SHARD_FORMATS = ("JPEG", "PNG", "WEBP")
SOURCE_FORMATS = SHARD_FORMATS + ("GIF", "BMP", "TIFF")
# PIL's process-wide bomb guard (Image.MAX_IMAGE_PIXELS) stays on for every other caller; the explicit
# max_pixels limit below comes first, and PIL's error past its own limit counts as too_large too.


class ImageRejected(ValueError):
    """An image that decodes but must not be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def open_image(data: bytes, max_pixels: int | None = None, min_side: int = 1,
               formats: tuple[str, ...] = SHARD_FORMATS) -> Image.Image:
    """Open encoded bytes lazily and check the header size before decoding pixels.

    :param data: encoded image bytes in one of ``formats`` (others raise ``PIL.UnidentifiedImageError``).
    :param max_pixels: refuse images with more pixels than this (decompression bombs); None = no limit.
    :param min_side: refuse images whose shorter side is below this.
    :raises ImageRejected: for a size outside the limits (reason ``too_large`` / ``too_small``).
    :raises OSError, SyntaxError, ValueError: for bytes PIL cannot parse.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=formats)
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_large", str(exc)) from exc
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageRejected("too_large", f"image of {w}x{h} exceeds max_pixels={max_pixels}")
    if min(w, h) < min_side:
        raise ImageRejected("too_small", f"image of {w}x{h} has a side below min_side={min_side}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; alpha (RGBA, LA, P with transparency) is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: rescale the full integer range to 8 bits rather than clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / max(hi - lo, 1e-12) * 255.0
        return Image.fromarray(arr.round().astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_rgb(data: bytes, max_pixels: int | None = None, min_side: int = 1,
               draft_size: int | None = None, formats: tuple[str, ...] = SHARD_FORMATS) -> Image.Image:
    """Decode bytes to a fully loaded RGB image (see ``decode_rgb_sized``)."""
    return decode_rgb_sized(data, max_pixels, min_side, draft_size, formats)[0]


def decode_rgb_sized(data: bytes, max_pixels: int | None = None, min_side: int = 1,
                     draft_size: int | None = None, formats: tuple[str, ...] = SHARD_FORMATS
                     ) -> tuple[Image.Image, tuple[int, int]]:
    """Decode bytes to a fully loaded RGB image, and return the stored (width, height) too.

    :param draft_size: if given, let the JPEG decoder downscale by a power of two while keeping the
        shorter side >= this (a large speed-up for big JPEGs that are resized afterwards anyway).
    :return: (RGB image, original size before any draft downscaling).
    """
    img = open_image(data, max_pixels=max_pixels, min_side=min_side, formats=formats)
    size = img.size
    if draft_size is not None and img.format == "JPEG":
        w, h = size
        scale = min(w, h) / draft_size
        if scale >= 2:
            img.draft("RGB", (max(1, int(w / scale)), max(1, int(h / scale))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Palette images with Transparency expressed in bytes"
        img.load()
    return to_rgb(img), size
