"""Encoded bytes -> an upright 8-bit RGB image, or a precise reason why not.

EXIF orientation is applied (the stored height and width are those of the upright image); grayscale,
grayscale+alpha, palette, RGBA, 16-bit, 32-bit integer and float, CMYK, YCbCr and LAB all become RGB;
transparent pixels are composited onto white, as transformers' `convert_to_rgb` does. Sizes are checked
from the header before any pixel is decoded, against our own limit rather than PIL's warning.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_IMAGE_PIXELS", "ImageDecodeError", "decode_image"]

# 8000 x 5000: post-processing holds several float masks at the original size, so the limit is about memory.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can label; the message says why."""


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes `data` into an upright RGB PIL image (mode 'RGB', uint8)."""
    if not data:
        raise ImageDecodeError("empty object (0 bytes)")
    with warnings.catch_warnings():
        # Our own size check below replaces PIL's decompression-bomb warning.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as error:
            raise ImageDecodeError(f"image dimensions exceed the decompression-bomb limit: {error}") from error
        except Image.UnidentifiedImageError as error:
            raise ImageDecodeError(f"not a recognised image format ({len(data)} bytes, starts with "
                                   f"{data[:8]!r})") from error
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(f"image is {width}x{height} = {width * height} pixels, above the limit of "
                                   f"{max_pixels} (raise --max-image-pixels to accept it)")
        try:
            image.seek(0)  # the first frame of animated GIF/multi-page TIFF
            image.load()
        except (OSError, SyntaxError, ValueError) as error:
            raise ImageDecodeError(f"corrupt or truncated {image.format or 'image'} data: {error}") from error
        ImageOps.exif_transpose(image, in_place=True)  # returning a new image would copy even an upright one
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        return _high_bit_depth_to_rgb(np.asarray(image), full_scale=65535)
    if mode == "F":
        return _high_bit_depth_to_rgb(np.asarray(image), full_scale=None)
    has_transparency = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if has_transparency:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_rgb(values: np.ndarray, *, full_scale: float | None) -> Image.Image:
    """16/32-bit grayscale scaled to 8 bits (PIL's own conversion clips everything above 255 to white)."""
    values = values.astype(np.float64)
    if full_scale is None:  # float images: [0, 1] if they look normalised, else taken as 8-bit values
        full_scale = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
    gray = np.clip(np.nan_to_num(values) / full_scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))
