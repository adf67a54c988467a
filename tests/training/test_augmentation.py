"""Training augmentation moves image and segment map together, draws reproducibly, and invents no ids."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_model import Mask2FormerImageProcessor
from training import ScaleCropFlip, load_coco_dataset

# Segment id -> the solid colour its pixels have in the image.
COLOURS = {0: (250, 20, 20), 1: (20, 250, 20), 2: (20, 20, 250), 7: (240, 240, 30)}


def ds_coloured_scene(height: int = 60, width: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """An image whose colour names the segment of every pixel: four regions, one of them a small square."""
    segment_map = np.zeros((height, width), dtype=np.int32)
    segment_map[:, width // 2:] = 1
    segment_map[height // 2:, : width // 2] = 2
    segment_map[10:22, 50:66] = 7
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for segment_id, colour in COLOURS.items():
        image[segment_map == segment_id] = colour
    return image, segment_map


def fraction_of_pixels_matching_their_segment_colour(image: np.ndarray, segment_map: np.ndarray) -> float:
    expected = np.zeros_like(image)
    for segment_id, colour in COLOURS.items():
        expected[segment_map == segment_id] = colour
    close = np.abs(image.astype(int) - expected.astype(int)).max(-1) <= 8
    return float(close.mean())


def test_certain_flip_at_scale_one_mirrors_image_and_map_exactly():
    image, segment_map = ds_coloured_scene()
    flip = ScaleCropFlip(min_scale=1.0, max_scale=1.0, flip_probability=1.0)
    flipped_image, flipped_map = flip(image, segment_map)
    assert np.array_equal(flipped_image, image[:, ::-1])
    assert np.array_equal(flipped_map, segment_map[:, ::-1])


@pytest.mark.parametrize("index", range(12))
def test_scale_crop_flip_keeps_every_segment_on_its_own_pixels(index):
    image, segment_map = ds_coloured_scene()
    augmentation = ScaleCropFlip(min_scale=0.5, max_scale=2.0, crop_size=(48, 56), flip_probability=0.5, seed=11)
    new_image, new_map = augmentation(image, segment_map, epoch=0, index=index)

    assert new_image.shape[:2] == new_map.shape and new_image.dtype == np.uint8
    assert new_map.dtype == segment_map.dtype
    assert set(np.unique(new_map).tolist()) <= set(COLOURS)  # nearest neighbour: no blended ids
    # Only pixels on a boundary may blend two colours (bilinear image resize); everything else must match.
    assert fraction_of_pixels_matching_their_segment_colour(new_image, new_map) > 0.9


def test_crop_size_bounds_the_output_and_a_smaller_scaled_image_is_kept_whole():
    image, segment_map = ds_coloured_scene(60, 80)
    large = ScaleCropFlip(min_scale=2.0, max_scale=2.0, crop_size=(32, 40))
    assert large(image, segment_map)[1].shape == (32, 40)
    small = ScaleCropFlip(min_scale=0.5, max_scale=0.5, crop_size=(50, 50))
    assert small(image, segment_map)[1].shape == (30, 40)


def test_same_seed_epoch_and_index_give_the_same_sample_and_other_epochs_differ():
    image, segment_map = ds_coloured_scene()
    augmentation = ScaleCropFlip(crop_size=(40, 40), seed=5)
    first = augmentation(image, segment_map, epoch=2, index=7)
    again = augmentation(image, segment_map, epoch=2, index=7)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    other_epochs = [augmentation(image, segment_map, epoch=epoch, index=7) for epoch in range(3, 7)]
    assert any(sample[1].shape != first[1].shape or not np.array_equal(sample[1], first[1])
               for sample in other_epochs)


@pytest.mark.parametrize("arguments", [{"min_scale": 0.0}, {"min_scale": 2.0, "max_scale": 1.0},
                                       {"flip_probability": 1.5}, {"crop_size": (0, 10)}])
def test_invalid_augmentation_settings_are_rejected(arguments):
    with pytest.raises(ValueError, match="ScaleCropFlip"):
        ScaleCropFlip(**arguments)


def test_image_and_map_of_different_sizes_are_rejected():
    image, segment_map = ds_coloured_scene()
    with pytest.raises(ValueError, match="segment map of size"):
        ScaleCropFlip()(image, segment_map[:-1])


def test_augmented_dataset_items_keep_the_target_mask_on_the_object_pixels(tmp_path):
    """End to end through the processor: the red square's mask covers red pixels in every augmented view."""
    height, width = 64, 64
    image = np.full((height, width, 3), 30, dtype=np.uint8)
    square = np.zeros((height, width), dtype=bool)
    square[8:30, 36:60] = True
    image[square] = (255, 0, 0)
    (tmp_path / "train").mkdir()
    Image.fromarray(image).save(tmp_path / "train" / "a.png")
    rle = mask_utils.encode(np.asfortranarray(square.astype(np.uint8)))
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png", "height": height, "width": width}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                         "segmentation": {"size": [height, width], "counts": rle["counts"].decode()}}],
        "categories": [{"id": 1, "name": "square"}]}))
    processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64}, ignore_index=255, num_labels=1)
    dataset = load_coco_dataset(str(tmp_path), "train", processor=processor, task="instance",
                                augmentation=ScaleCropFlip(min_scale=0.7, max_scale=1.6, crop_size=(48, 48), seed=1))

    red_channel_mean, red_channel_std = 0.485, 0.229
    red_threshold = (142 / 255 - red_channel_mean) / red_channel_std  # halfway from the grey 30 to red 255
    views_with_the_square = 0
    for epoch in range(6):
        dataset.set_epoch(epoch)
        item = dataset[0]
        red = item["pixel_values"][0] > red_threshold  # (H, W)
        if item["mask_labels"].shape[0] == 0:
            assert red.sum() < 20  # the crop missed the square
            continue
        mask = item["mask_labels"][0].bool()
        agreement = (mask == red).float().mean().item()
        assert agreement > 0.97, f"epoch {epoch}: mask and red pixels agree on only {agreement:.3f}"
        views_with_the_square += 1
    assert views_with_the_square >= 3
