"""PNG overlays for a person to look at: each segment filled with its own color, outlined, and labeled.

Made on the driver after the run from what the tables hold (RLE decoded, original image re-read), so an
overlay shows exactly what was written, not an intermediate of the pipeline.
"""
from __future__ import annotations

import colorsys
import io
import posixpath
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw
from pycocotools import mask as coco_mask

from pipeline.decode import decode_image
from pipeline.storage import StorageConfig, join_uri

__all__ = ["OVERLAYS_DIR", "render_overlay", "write_overlays"]

OVERLAYS_DIR = "overlays"
_TASK_PREFERENCE = ("panoptic", "instance", "semantic")


def _color(index: int) -> tuple[int, int, int]:
    hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbouring ids apart
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.75, 1.0)
    return int(red * 255), int(green * 255), int(blue * 255)


def render_overlay(image: Image.Image, segments: list[dict], *, alpha: float = 0.5) -> Image.Image:
    """`image` (RGB) with `segments` (dicts with rle_size, rle_counts, label, score) drawn over it."""
    base = np.asarray(image, dtype=np.float32).copy()
    label_positions = []
    for index, segment in enumerate(segments):
        mask = coco_mask.decode({"size": list(segment["rle_size"]), "counts": segment["rle_counts"]}).astype(bool)
        if mask.shape != base.shape[:2] or not mask.any():
            continue
        color = np.array(_color(index), dtype=np.float32)
        base[mask] = (1 - alpha) * base[mask] + alpha * color
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        base[edge] = color
        rows, cols = np.nonzero(mask)
        middle = len(rows) // 2  # a pixel of the mask itself, near its middle in raster order
        text = segment["label"] if segment.get("score") is None else f"{segment['label']} {segment['score']:.2f}"
        label_positions.append((int(cols[middle]), int(rows[middle]), text))
    overlay = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(overlay)
    taken: list[tuple[int, int, int, int]] = []
    for x, y, text in label_positions:
        left, top, right, bottom = draw.textbbox((x, y), text)
        while any(left < r and right > l and top < b and bottom > t for l, t, r, b in taken):
            y += bottom - top + 2  # move below labels already drawn instead of covering them
            left, top, right, bottom = draw.textbbox((x, y), text)
        taken.append((left, top, right, bottom))
        draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=(0, 0, 0))
        draw.text((x, y), text, fill=(255, 255, 255))
    return overlay


def write_overlays(output_uri: str, storage: StorageConfig, images: pa.Table, segments: pa.Table, *,
                   count: int, tasks: tuple[str, ...]) -> list[str]:
    """Writes overlays for the first `count` ok images (by image_id) to <output>/overlays/; returns their URIs."""
    if count <= 0 or images.num_rows == 0:
        return []
    task = next(t for t in _TASK_PREFERENCE if t in tasks)
    ok = images.filter(pc.equal(images["status"], "ok")).sort_by("image_id")
    written = []
    filesystem, root = storage.filesystem(output_uri)
    for row in ok.slice(0, count).to_pylist():
        selected = segments.filter(pc.and_(pc.equal(segments["image_uri"], row["image_uri"]),
                                           pc.equal(segments["task"], task))).to_pylist()
        image = decode_image(storage.read_bytes(row["image_uri"]))
        buffer = io.BytesIO()
        render_overlay(image, selected).save(buffer, format="PNG")
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", row["image_id"]).strip("_") + f".{task}.png"
        path = posixpath.join(root, OVERLAYS_DIR, name)
        filesystem.makedirs(posixpath.dirname(path), exist_ok=True)
        with filesystem.open(path, "wb") as handle:
            handle.write(buffer.getvalue())
        written.append(join_uri(output_uri, OVERLAYS_DIR, name))
    return written
