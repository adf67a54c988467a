"""A deterministic synthetic segmentation dataset: coloured shapes ("things") on two textured regions ("stuff").

Written in the standard COCO layout, so every loader and evaluator treats it like real data:

    {root}/{split}/{index:06d}.png                       RGB images
    {root}/annotations/instances_{split}.json            COCO instances (things only, RLE masks)
    {root}/annotations/panoptic_{split}.json             COCO panoptic (segments_info per image)
    {root}/annotations/panoptic_{split}/{index:06d}.png  panoptic ids, id = R + 256 G + 256^2 B

Design choices (see models/m2f-shapes-tiny/README.md for why):
- Each thing class has its own hue band (circle red, square green, triangle blue) at high saturation, while
  the stuff regions are low-saturation textures. A small model trained for minutes on 2 CPU cores can then
  learn the class from colour and the mask from shape; with shape-only classes it stays at chance.
- Objects are 24-48 px on 128x128 images; an object may be partly covered by later ones, but at least
  half of it (and >= 120 px) stays visible, so every annotation is a clearly visible segment.
- Every image is drawn from its own generator seeded by (seed, split, index): train and val come from the
  same distribution, and any image can be regenerated on its own.
"""
from __future__ import annotations

import colorsys
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

__all__ = ["SHAPES_CATEGORIES", "ShapesConfig", "ShapesSample", "render_sample", "write_shapes_dataset",
           "rgb_to_panoptic_id", "panoptic_id_to_rgb"]

# COCO category records; contiguous model label ids follow this order (0 = circle ... 4 = ground).
SHAPES_CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle", "supercategory": "shape", "isthing": 1, "color": [220, 40, 40]},
    {"id": 2, "name": "square", "supercategory": "shape", "isthing": 1, "color": [40, 200, 40]},
    {"id": 3, "name": "triangle", "supercategory": "shape", "isthing": 1, "color": [40, 40, 220]},
    {"id": 4, "name": "sky", "supercategory": "background", "isthing": 0, "color": [180, 200, 230]},
    {"id": 5, "name": "ground", "supercategory": "background", "isthing": 0, "color": [110, 90, 60]},
]
_THING_NAMES = ("circle", "square", "triangle")
_CATEGORY_ID = {c["name"]: c["id"] for c in SHAPES_CATEGORIES}
# Hue band (degrees) per thing class; bands are 100 degrees apart so colour alone names the class.
_HUE_CENTER_DEGREES = {"circle": 0.0, "square": 120.0, "triangle": 240.0}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class ShapesConfig:
    """Knobs of the generator; the defaults are what the demo model was trained on."""

    image_size: int = 128
    min_things: int = 1
    max_things: int = 4
    min_object_size: int = 24
    max_object_size: int = 48
    hue_half_width_degrees: float = 20.0
    min_visible_fraction: float = 0.5
    min_visible_pixels: int = 120


@dataclass
class ShapesSample:
    """One rendered image with its panoptic map and segment records."""

    image: np.ndarray  # (H, W, 3) uint8
    panoptic_ids: np.ndarray  # (H, W) int32, 0 = unlabeled (never happens: stuff covers every pixel)
    segments: list[dict] = field(default_factory=list)  # {"id", "category_id", "isthing"}


def rgb_to_panoptic_id(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 panoptic PNG -> (H, W) int64 segment ids (id = R + 256 G + 256^2 B)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def panoptic_id_to_rgb(ids: np.ndarray) -> np.ndarray:
    """(H, W) segment ids -> (H, W, 3) uint8 for a panoptic PNG."""
    ids = ids.astype(np.int64)
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def _hsv_to_rgb255(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    r, g, b = colorsys.hsv_to_rgb((hue_degrees % 360.0) / 360.0, saturation, value)
    return np.array([r, g, b], dtype=np.float32) * 255.0


def _stuff_layers(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sky above a wavy horizon, ground below; both low-saturation textures. Returns (image float, is_sky)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    horizon = (rng.uniform(0.40, 0.65) * size
               + rng.uniform(3.0, 10.0) * np.sin(2 * math.pi * xs / rng.uniform(40.0, 120.0) + rng.uniform(0, 2 * math.pi)))
    is_sky = ys < horizon  # (H, W) bool

    sky_top = _hsv_to_rgb255(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.80, 0.95))
    sky_bottom = _hsv_to_rgb255(rng.uniform(0, 360), rng.uniform(0.0, 0.25), rng.uniform(0.70, 0.85))
    vertical = (ys / size)[..., None]
    sky = sky_top * (1 - vertical) + sky_bottom * vertical + rng.normal(0, 4.0, (size, size, 1))

    ground_base = _hsv_to_rgb255(rng.uniform(0, 360), rng.uniform(0.0, 0.3), rng.uniform(0.30, 0.55))
    stripe_period = rng.uniform(5.0, 12.0)
    stripes = 18.0 * np.sin(2 * math.pi * (ys + 0.3 * xs) / stripe_period)[..., None]
    ground = ground_base + stripes + rng.normal(0, 10.0, (size, size, 3))

    return np.where(is_sky[..., None], sky, ground), is_sky


def _thing_mask(rng: np.random.Generator, name: str, size: int, image_size: int) -> np.ndarray:
    """A filled shape of extent `size` fully inside the image, as an (H, W) bool mask."""
    canvas = Image.new("L", (image_size, image_size), 0)
    draw = ImageDraw.Draw(canvas)
    half = size / 2.0
    cx = rng.uniform(half, image_size - half)
    cy = rng.uniform(half, image_size - half)
    if name == "circle":
        draw.ellipse([cx - half, cy - half, cx + half, cy + half], fill=1)
    else:
        corners = 4 if name == "square" else 3
        # Circumradius s/2: the shape stays inside its s x s box at any rotation.
        radius = half
        start = rng.uniform(0, 2 * math.pi)
        points = [(cx + radius * math.cos(start + 2 * math.pi * k / corners),
                   cy + radius * math.sin(start + 2 * math.pi * k / corners)) for k in range(corners)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool)


def render_sample(seed: int, split: str, index: int, config: ShapesConfig = ShapesConfig()) -> ShapesSample:
    """Renders image `index` of `split`; the same (seed, split, index, config) always gives the same sample."""
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(_SPLIT_CODES)}")
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    size = config.image_size
    image, is_sky = _stuff_layers(rng, size)
    panoptic_ids = np.where(is_sky, 1, 2).astype(np.int32)
    segments = [{"id": 1, "category_id": _CATEGORY_ID["sky"], "isthing": 0},
                {"id": 2, "category_id": _CATEGORY_ID["ground"], "isthing": 0}]

    placed: list[tuple[str, np.ndarray, np.ndarray]] = []  # (class name, full mask, colour)
    for _ in range(int(rng.integers(config.min_things, config.max_things + 1))):
        name = _THING_NAMES[int(rng.integers(len(_THING_NAMES)))]
        colour = _hsv_to_rgb255(_HUE_CENTER_DEGREES[name] + rng.uniform(-1, 1) * config.hue_half_width_degrees,
                                rng.uniform(0.65, 1.0), rng.uniform(0.65, 1.0))
        for _attempt in range(10):
            full = _thing_mask(rng, name, int(rng.integers(config.min_object_size, config.max_object_size + 1)), size)
            if _keeps_everyone_visible(placed, full, config):
                placed.append((name, full, colour))
                break

    next_id = 3
    for order, (name, full, colour) in enumerate(placed):
        visible = full.copy()
        for _later_name, later_full, _c in placed[order + 1:]:
            visible &= ~later_full
        image[full] = colour + rng.normal(0, 4.0, (int(full.sum()), 3))
        panoptic_ids[visible] = next_id
        segments.append({"id": next_id, "category_id": _CATEGORY_ID[name], "isthing": 1})
        next_id += 1
    # A stuff region wholly covered by things has no pixels left and is not a segment.
    segments = [s for s in segments if (panoptic_ids == s["id"]).any()]
    return ShapesSample(image=np.clip(image, 0, 255).astype(np.uint8), panoptic_ids=panoptic_ids, segments=segments)


def _keeps_everyone_visible(placed: list[tuple[str, np.ndarray, np.ndarray]], new_mask: np.ndarray,
                            config: ShapesConfig) -> bool:
    """True when drawing `new_mask` on top leaves every earlier object sufficiently visible."""
    for index, (_name, full, _colour) in enumerate(placed):
        visible = full & ~new_mask
        for _later_name, later_full, _c in placed[index + 1:]:
            visible &= ~later_full
        area = int(visible.sum())
        if area < config.min_visible_pixels or area < config.min_visible_fraction * full.sum():
            return False
    return True


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def write_shapes_dataset(root: str | Path, *, splits: dict[str, int], seed: int = 0,
                         config: ShapesConfig = ShapesConfig()) -> Path:
    """Writes `splits` (e.g. {"train": 4000, "val": 200}) under `root` in COCO instance + panoptic layout."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    thing_categories = [{k: v for k, v in c.items() if k != "color"} for c in SHAPES_CATEGORIES if c["isthing"]]
    for split, count in splits.items():
        image_dir = root / split
        panoptic_dir = root / "annotations" / f"panoptic_{split}"
        image_dir.mkdir(parents=True, exist_ok=True)
        panoptic_dir.mkdir(parents=True, exist_ok=True)
        images, instance_annotations, panoptic_annotations = [], [], []
        for index in range(count):
            sample = render_sample(seed, split, index, config)
            image_id = index + 1
            file_name = f"{index:06d}.png"
            Image.fromarray(sample.image).save(image_dir / file_name)
            Image.fromarray(panoptic_id_to_rgb(sample.panoptic_ids)).save(panoptic_dir / file_name)
            height, width = sample.panoptic_ids.shape
            images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
            segments_info = []
            for segment in sample.segments:
                mask = sample.panoptic_ids == segment["id"]
                area, bbox = int(mask.sum()), _bbox(mask)
                segments_info.append({"id": segment["id"], "category_id": segment["category_id"],
                                      "area": area, "bbox": bbox, "iscrowd": 0})
                if segment["isthing"]:
                    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                    instance_annotations.append({
                        "id": len(instance_annotations) + 1, "image_id": image_id,
                        "category_id": segment["category_id"], "iscrowd": 0, "area": area, "bbox": bbox,
                        "segmentation": {"size": [height, width], "counts": rle["counts"].decode("ascii")},
                    })
            panoptic_annotations.append({"image_id": image_id, "file_name": file_name,
                                         "segments_info": segments_info})
        info = {"description": "m2f synthetic shapes", "seed": seed, "split": split,
                "config": config.__dict__}
        _write_json(root / "annotations" / f"instances_{split}.json",
                    {"info": info, "images": images, "annotations": instance_annotations,
                     "categories": thing_categories})
        _write_json(root / "annotations" / f"panoptic_{split}.json",
                    {"info": info, "images": images, "annotations": panoptic_annotations,
                     "categories": [dict(c) for c in SHAPES_CATEGORIES]})
    return root


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload))
