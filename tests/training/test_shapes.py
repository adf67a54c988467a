"""The synthetic shapes dataset is deterministic and its instance and panoptic annotations agree."""
from __future__ import annotations

import colorsys
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from training.shapes import (SHAPES_CATEGORIES, ShapesConfig, panoptic_id_to_rgb, render_sample,
                             rgb_to_panoptic_id, write_shapes_dataset)


@pytest.fixture(scope="module")
def train_shapes_root(tmp_path_factory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), splits={"train": 12, "val": 6}, seed=3)


def test_same_seed_renders_identical_samples_and_other_seeds_differ():
    first, again = render_sample(5, "train", 7), render_sample(5, "train", 7)
    assert np.array_equal(first.image, again.image)
    assert np.array_equal(first.panoptic_ids, again.panoptic_ids)
    assert first.segments == again.segments
    assert not np.array_equal(first.image, render_sample(6, "train", 7).image)
    assert not np.array_equal(first.image, render_sample(5, "val", 7).image)


def test_written_dataset_is_byte_identical_across_runs(tmp_path, train_shapes_root):
    again = write_shapes_dataset(tmp_path / "again", splits={"train": 12, "val": 6}, seed=3)
    for relative in ["annotations/instances_train.json", "annotations/panoptic_val.json", "train/000004.png",
                     "annotations/panoptic_val/000002.png"]:
        assert (again / relative).read_bytes() == (train_shapes_root / relative).read_bytes(), relative


def test_layout_has_standard_coco_files(train_shapes_root):
    for split, count in (("train", 12), ("val", 6)):
        assert len(list((train_shapes_root / split).glob("*.png"))) == count
        assert len(list((train_shapes_root / "annotations" / f"panoptic_{split}").glob("*.png"))) == count
        assert (train_shapes_root / "annotations" / f"instances_{split}.json").is_file()


def test_panoptic_segments_match_their_png_and_cover_every_pixel(train_shapes_root):
    panoptic = json.loads((train_shapes_root / "annotations" / "panoptic_val.json").read_text())
    categories = {c["id"]: c for c in panoptic["categories"]}
    assert {c["name"]: c["isthing"] for c in panoptic["categories"]} == {
        "circle": 1, "square": 1, "triangle": 1, "sky": 0, "ground": 0}
    for annotation in panoptic["annotations"]:
        png = np.asarray(Image.open(train_shapes_root / "annotations" / "panoptic_val" / annotation["file_name"]))
        ids = rgb_to_panoptic_id(png)
        listed = {s["id"]: s for s in annotation["segments_info"]}
        assert set(np.unique(ids).tolist()) == set(listed), "every pixel belongs to a listed segment"
        for segment_id, segment in listed.items():
            mask = ids == segment_id
            assert segment["area"] == int(mask.sum())
            ys, xs = np.nonzero(mask)
            assert segment["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]
            assert segment["category_id"] in categories
        stuff = [s for s in annotation["segments_info"] if not categories[s["category_id"]]["isthing"]]
        assert len({s["category_id"] for s in stuff}) == len(stuff), "one segment per stuff class"


def test_instance_masks_equal_the_thing_segments_of_the_panoptic_png(train_shapes_root):
    instances = json.loads((train_shapes_root / "annotations" / "instances_train.json").read_text())
    panoptic = json.loads((train_shapes_root / "annotations" / "panoptic_train.json").read_text())
    assert all(c["isthing"] == 1 for c in instances["categories"])
    by_image: dict[int, list[dict]] = {}
    for annotation in instances["annotations"]:
        by_image.setdefault(annotation["image_id"], []).append(annotation)
    thing_ids = {c["id"] for c in SHAPES_CATEGORIES if c["isthing"]}
    for annotation in panoptic["annotations"]:
        ids = rgb_to_panoptic_id(np.asarray(Image.open(
            train_shapes_root / "annotations" / "panoptic_train" / annotation["file_name"])))
        things = [s for s in annotation["segments_info"] if s["category_id"] in thing_ids]
        found = by_image.get(annotation["image_id"], [])
        assert len(found) == len(things)
        for segment, instance in zip(things, found):
            decoded = mask_utils.decode({"size": instance["segmentation"]["size"],
                                         "counts": instance["segmentation"]["counts"].encode("ascii")})
            assert np.array_equal(decoded.astype(bool), ids == segment["id"])
            assert instance["category_id"] == segment["category_id"]
            assert instance["area"] == segment["area"]


def test_things_respect_size_visibility_and_class_hue():
    config = ShapesConfig()
    hue_center = {1: 0.0, 2: 120.0, 3: 240.0}
    for index in range(20):
        sample = render_sample(0, "train", index, config)
        things = [s for s in sample.segments if s["isthing"]]
        assert config.min_things <= len(things) <= config.max_things
        for segment in things:
            mask = sample.panoptic_ids == segment["id"]
            assert mask.sum() >= config.min_visible_pixels
            ys, xs = np.nonzero(mask)
            assert max(np.ptp(xs), np.ptp(ys)) + 1 <= config.max_object_size + 1
            mean_rgb = sample.image[mask].mean(axis=0) / 255.0
            hue = 360.0 * colorsys.rgb_to_hsv(*mean_rgb)[0]
            distance = min(abs(hue - hue_center[segment["category_id"]]),
                           360 - abs(hue - hue_center[segment["category_id"]]))
            assert distance <= config.hue_half_width_degrees + 8  # noise shifts the mean hue a little


def test_panoptic_id_png_round_trip():
    ids = np.array([[0, 1, 255], [256, 65536 + 3, 70000]], dtype=np.int64)
    assert np.array_equal(rgb_to_panoptic_id(panoptic_id_to_rgb(ids)), ids)


def test_unknown_split_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        render_sample(0, "dev", 0)
