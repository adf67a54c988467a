"""Decoding: EXIF orientation, every pixel mode to 8-bit RGB, and precise errors for bytes that are not images."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.decode import ImageDecodeError, decode_image
from pipeline_test_images import image_bytes, random_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied_and_size_is_the_upright_one():
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)  # left half red as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(Image.fromarray(pixels), "JPEG", exif=exif.tobytes(), quality=95)
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (40, 20, 3)
    assert decoded[2, 10, 0] > 200 and decoded[-3, 10, 0] < 60  # stored left half is now the top


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("1", "PNG"), ("P", "PNG"), ("CMYK", "TIFF"),
                                         ("CMYK", "JPEG"), ("YCbCr", "JPEG"), ("LAB", "TIFF"), ("RGB", "PNG")])
def test_opaque_modes_become_rgb_uint8(mode, fmt):
    decoded = decode_image(encode(Image.fromarray(random_rgb(9, 7)).convert(mode), fmt))
    assert decoded.mode == "RGB" and decoded.size == (7, 9)
    assert np.asarray(decoded).dtype == np.uint8


def test_cmyk_jpeg_converts_to_the_matching_rgb():
    rgb = np.full((8, 8, 3), (200, 40, 40), np.uint8)
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=100)
    assert np.abs(np.asarray(decode_image(data)).astype(int) - rgb).max() < 12


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_transparent_pixels_are_composited_on_white(mode):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 10
    rgba[:2, :, 3] = 255  # top half opaque dark, bottom half fully transparent
    decoded = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA").convert(mode))))
    assert (decoded[:2] == 10).all() and (decoded[2:] == 255).all()


def test_palette_transparency_is_composited_on_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((0, 0), 1)
    data = encode(image, "PNG", transparency=0)
    decoded = np.asarray(decode_image(data))
    assert tuple(decoded[0, 0]) == (0, 0, 255) and tuple(decoded[3, 3]) == (255, 255, 255)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    decoded = np.asarray(decode_image(encode(Image.fromarray(values))))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]
    assert (decoded[..., 0] == decoded[..., 2]).all()


def test_float_image_in_unit_range_is_scaled_to_8_bits():
    values = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    decoded = np.asarray(decode_image(encode(Image.fromarray(values, "F"), "TIFF")))
    assert decoded[0, :, 0].tolist() == [0, 128, 255]


def test_first_frame_of_an_animated_gif():
    frames = [Image.new("RGB", (5, 5), color) for color in [(255, 0, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert np.asarray(decode_image(buffer.getvalue()))[2, 2, 0] > 200


def test_zero_byte_object_is_a_decode_error():
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")


def test_non_image_with_image_extension_is_a_decode_error():
    with pytest.raises(ImageDecodeError, match="not a recognised image"):
        decode_image(b"this is a text file pretending to be a PNG\n")


def test_truncated_jpeg_is_a_decode_error():
    data = image_bytes(random_rgb(64, 64), "JPEG")
    with pytest.raises(ImageDecodeError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_huge_dimensions_are_refused_from_the_header_without_decoding():
    with pytest.raises(ImageDecodeError, match="100000x100000|decompression-bomb"):
        decode_image(_png_header_only(100_000, 100_000))


def test_pixel_limit_is_our_own_and_configurable():
    data = image_bytes(random_rgb(100, 60))
    with pytest.raises(ImageDecodeError, match="60x100 = 6000 pixels, above the limit of 5000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=6000).size == (60, 100)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_gives_pils_own_transposed_pixels(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(Image.fromarray(random_rgb(12, 20)), "JPEG", exif=exif.tobytes(), quality=95)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(expected))
