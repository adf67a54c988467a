"""Preprocessing parity: m2f_model's processor against transformers' default (torchvision) processor.

pixel_values must agree within 1e-4; pixel_mask, mask_labels and class_labels exactly (values,
dtypes and shapes).
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from m2f_model.image_processing import Mask2FormerImageProcessor, segmentation_map_to_binary_masks

IMAGE_SIZES = [(60, 80), (45, 101), (60, 80), (33, 20)]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in IMAGE_SIZES]


def _semantic_maps(seed: int = 1, num_ids: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    maps = []
    for h, w in IMAGE_SIZES:
        segmentation_map = rng.integers(0, num_ids, (h, w), dtype=np.uint8)
        segmentation_map[: h // 6] = 255  # a void band
        maps.append(segmentation_map)
    return maps


def _assert_same_encoding(reference, ours) -> None:
    assert set(reference.keys()) == set(ours.keys())
    expected, actual = reference["pixel_values"], ours["pixel_values"]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.allclose(actual, expected, atol=1e-4, rtol=0)
    assert ours["pixel_mask"].dtype == reference["pixel_mask"].dtype
    assert torch.equal(ours["pixel_mask"], reference["pixel_mask"])
    if "mask_labels" in reference:
        assert len(ours["mask_labels"]) == len(reference["mask_labels"])
        for expected_masks, masks in zip(reference["mask_labels"], ours["mask_labels"]):
            assert masks.dtype == expected_masks.dtype and masks.shape == expected_masks.shape
            assert torch.equal(masks, expected_masks)
        for expected_labels, labels in zip(reference["class_labels"], ours["class_labels"]):
            assert labels.dtype == expected_labels.dtype
            assert torch.equal(labels, expected_labels)


SETTINGS = [
    pytest.param({}, id="defaults-shortest800-longest1333"),
    pytest.param({"size": {"height": 64, "width": 64}}, id="fixed-square"),
    pytest.param({"size": {"shortest_edge": 50, "longest_edge": 90}}, id="shortest-edge-capped"),
    pytest.param({"size": {"height": 40, "width": 50}, "size_divisor": 0}, id="fixed-no-divisor"),
    pytest.param({"size": {"max_height": 70, "max_width": 50}}, id="max-height-width"),
    pytest.param({"do_resize": False}, id="no-resize"),
    pytest.param({"size": {"height": 48, "width": 48}, "resample": 3}, id="bicubic"),
    pytest.param({"size": {"height": 48, "width": 48}, "resample": 0}, id="nearest"),
    pytest.param({"size": {"height": 64, "width": 64}, "do_normalize": False}, id="rescale-only"),
    pytest.param({"size": {"height": 64, "width": 64}, "do_rescale": False}, id="normalize-only"),
    pytest.param({"size": {"height": 32, "width": 32}, "pad_size": {"height": 40, "width": 72}}, id="pad-size"),
    pytest.param({"size": {"height": 64, "width": 64}, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.4],
                  "rescale_factor": 1 / 200}, id="custom-normalisation"),
]

INPUT_KINDS = {
    "numpy-hwc": lambda images: images,
    "numpy-chw": lambda images: [image.transpose(2, 0, 1) for image in images],
    "pil": lambda images: [Image.fromarray(image) for image in images],
    "torch-chw": lambda images: [torch.from_numpy(image).permute(2, 0, 1) for image in images],
    "single-numpy": lambda images: images[0],
    "single-pil": lambda images: Image.fromarray(images[1]),
    "torch-batch-4d": lambda images: torch.from_numpy(np.stack([images[0], images[2]])).permute(0, 3, 1, 2),
}


@pytest.mark.parametrize("settings", SETTINGS)
@pytest.mark.parametrize("input_kind", list(INPUT_KINDS))
def test_pixel_values_and_mask_match_transformers(settings, input_kind):
    images = INPUT_KINDS[input_kind](_images())
    reference = transformers.Mask2FormerImageProcessor(**settings)(images, return_tensors="pt")
    ours = Mask2FormerImageProcessor(**settings)(images, return_tensors="pt")
    _assert_same_encoding(reference, ours)


def test_float_images_match_transformers():
    images = [image.astype(np.float32) / 255.0 for image in _images()]
    settings = {"size": {"height": 56, "width": 72}, "do_rescale": False}
    reference = transformers.Mask2FormerImageProcessor(**settings)(images, return_tensors="pt")
    _assert_same_encoding(reference, Mask2FormerImageProcessor(**settings)(images))


def test_grayscale_converted_to_rgb_matches_transformers():
    images = [Image.fromarray(image[..., 0]) for image in _images()]
    settings = {"size": {"height": 40, "width": 40}, "do_convert_rgb": True}
    reference = transformers.Mask2FormerImageProcessor(**settings)(images, return_tensors="pt")
    _assert_same_encoding(reference, Mask2FormerImageProcessor(**settings)(images))


MAP_SETTINGS = [
    pytest.param({"size": {"height": 64, "width": 64}}, id="no-ignore-index"),
    pytest.param({"size": {"height": 64, "width": 64}, "ignore_index": 255}, id="ignore-255"),
    pytest.param({"size": {"height": 64, "width": 64}, "ignore_index": 255, "do_reduce_labels": True},
                 id="reduce-labels"),
    pytest.param({"size": {"shortest_edge": 50, "longest_edge": 90}, "ignore_index": 255}, id="shortest-edge"),
    pytest.param({"do_resize": False, "ignore_index": 255}, id="no-resize"),
    pytest.param({"size": {"height": 32, "width": 48}, "ignore_index": 255, "pad_size": {"height": 40, "width": 64}},
                 id="pad-size"),
]


@pytest.mark.parametrize("settings", MAP_SETTINGS)
@pytest.mark.parametrize("map_kind", ["numpy", "pil", "torch-int64"])
def test_semantic_maps_give_transformers_mask_and_class_labels(settings, map_kind):
    images, maps = _images(), _semantic_maps()
    if map_kind == "pil":
        maps = [Image.fromarray(segmentation_map) for segmentation_map in maps]
    elif map_kind == "torch-int64":
        maps = [torch.from_numpy(segmentation_map).long() for segmentation_map in maps]
    reference = transformers.Mask2FormerImageProcessor(**settings)(images, segmentation_maps=maps,
                                                                   return_tensors="pt")
    ours = Mask2FormerImageProcessor(**settings)(images, segmentation_maps=maps)
    _assert_same_encoding(reference, ours)


@pytest.mark.parametrize("reduce_labels", [False, True])
@pytest.mark.parametrize("per_image", [False, True])
def test_instance_maps_with_instance_id_to_semantic_id_match_transformers(reduce_labels, per_image):
    images = _images()
    rng = np.random.default_rng(3)
    maps = [rng.integers(0, 7, (h, w)).astype(np.int32) for h, w in IMAGE_SIZES]
    mappings = [{instance: (instance * 3 + image_index) % 5 + 1 for instance in range(8)}
                for image_index in range(len(images))]
    mapping = mappings if per_image else mappings[0]
    settings = {"size": {"height": 48, "width": 64}, "ignore_index": 255, "do_reduce_labels": reduce_labels}
    reference = transformers.Mask2FormerImageProcessor(**settings)(
        images, segmentation_maps=maps, instance_id_to_semantic_id=mapping, return_tensors="pt")
    ours = Mask2FormerImageProcessor(**settings)(images, segmentation_maps=maps, instance_id_to_semantic_id=mapping)
    _assert_same_encoding(reference, ours)


def test_all_void_map_gives_empty_targets_like_transformers():
    images = _images()[:2]
    maps = [np.full(IMAGE_SIZES[i], 255, dtype=np.uint8) for i in range(2)]
    settings = {"size": {"height": 32, "width": 32}, "ignore_index": 255}
    reference = transformers.Mask2FormerImageProcessor(**settings)(images, segmentation_maps=maps,
                                                                   return_tensors="pt")
    ours = Mask2FormerImageProcessor(**settings)(images, segmentation_maps=maps)
    _assert_same_encoding(reference, ours)
    assert ours["mask_labels"][0].shape == (0, 32, 32)


def test_padded_area_of_mask_labels_holds_ignore_index_like_transformers():
    images, maps = _images()[:2], _semantic_maps()[:2]
    ours = Mask2FormerImageProcessor(do_resize=False, ignore_index=255)(images, segmentation_maps=maps)
    # Image 0 is 60x80, the batch is padded to 60x101: columns 80.. of image 0's binary masks hold 255.
    assert torch.all(ours["mask_labels"][0][:, :, 80:] == 255)
    assert torch.all(ours["pixel_mask"][0][:, 80:] == 0) and torch.all(ours["pixel_mask"][0][:, :80] == 1)


def test_return_tensors_none_gives_lists_like_transformers():
    images = _images()[:2]
    settings = {"size": {"height": 32, "width": 32}}
    reference = transformers.Mask2FormerImageProcessor(**settings)(images)
    ours = Mask2FormerImageProcessor(**settings)(images, return_tensors=None)
    assert isinstance(ours["pixel_values"], list) and isinstance(reference["pixel_values"], list)
    for expected, actual in zip(reference["pixel_values"], ours["pixel_values"]):
        assert torch.allclose(actual, expected, atol=1e-4, rtol=0)


def test_shortest_edge_without_longest_edge_is_rejected_like_transformers():
    image = _images()[0]
    with pytest.raises(ValueError):
        transformers.Mask2FormerImageProcessor(size=40)(image, return_tensors="pt")
    with pytest.raises(ValueError, match="shortest_edge"):
        Mask2FormerImageProcessor(size=40)(image)


def test_call_overrides_replace_constructor_settings():
    images = _images()[:2]
    reference = transformers.Mask2FormerImageProcessor(size={"height": 40, "width": 56})(images, return_tensors="pt")
    ours = Mask2FormerImageProcessor()(images, size={"height": 40, "width": 56})
    _assert_same_encoding(reference, ours)


def test_max_size_alias_sets_longest_edge_like_transformers():
    reference = transformers.Mask2FormerImageProcessor(max_size=100)
    ours = Mask2FormerImageProcessor(max_size=100)
    assert ours.size == {"shortest_edge": 800, "longest_edge": 100}
    assert reference.size.longest_edge == 100 and reference.size.shortest_edge == 800
    _assert_same_encoding(reference(_images(), return_tensors="pt"), ours(_images()))


def test_legacy_reduce_labels_key_is_ignored_like_transformers(caplog):
    config = {"reduce_labels": True, "size_divisibility": 64, "ignore_index": 255, "size": {"height": 32, "width": 32}}
    reference = transformers.Mask2FormerImageProcessor.from_dict(config)
    with caplog.at_level(logging.WARNING):
        ours = Mask2FormerImageProcessor.from_dict(config)
    assert ours.do_reduce_labels is False and reference.do_reduce_labels is False
    assert ours.size_divisor == 32 == reference.size_divisor
    assert "reduce_labels" in caplog.text
    images, maps = _images()[:2], _semantic_maps()[:2]
    _assert_same_encoding(reference(images, segmentation_maps=maps, return_tensors="pt"),
                          ours(images, segmentation_maps=maps))


def test_transformers_reads_our_saved_config(tmp_path):
    ours = Mask2FormerImageProcessor(size={"height": 384, "width": 384}, ignore_index=255, num_labels=80,
                                     do_reduce_labels=True, resample=3, pad_size={"height": 416, "width": 416})
    ours.save_pretrained(tmp_path)
    reference = transformers.Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert dict(reference.size) == {**{k: None for k in dict(reference.size)}, "height": 384, "width": 384}
    assert reference.ignore_index == 255 and reference.num_labels == 80 and reference.do_reduce_labels is True
    assert int(reference.resample) == 3
    assert reference.pad_size.height == 416


def test_we_read_transformers_saved_config_and_preprocess_the_same(tmp_path):
    reference = transformers.Mask2FormerImageProcessor(size={"height": 48, "width": 64}, ignore_index=255,
                                                       num_labels=4, image_mean=[0.5, 0.5, 0.5])
    reference.save_pretrained(tmp_path)
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    assert ours.ignore_index == 255 and ours.num_labels == 4 and ours.image_mean == (0.5, 0.5, 0.5)
    images, maps = _images(), _semantic_maps()
    _assert_same_encoding(reference(images, segmentation_maps=maps, return_tensors="pt"),
                          ours(images, segmentation_maps=maps))


def test_hub_style_config_with_legacy_keys_loads(tmp_path):
    hub_config = {"do_normalize": True, "do_resize": True, "ignore_index": 255, "num_labels": 80,
                  "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                  "feature_extractor_type": "MaskFormerFeatureExtractor", "reduce_labels": False, "resample": 2,
                  "size": {"height": 384, "width": 384}, "size_divisibility": 32, "size_divisor": 32,
                  "image_processor_type": "Mask2FormerImageProcessor"}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(hub_config))
    ours = Mask2FormerImageProcessor.from_pretrained(tmp_path)
    encoded = ours(_images()[0])
    assert encoded["pixel_values"].shape == (1, 3, 384, 384)
    saved = ours.to_dict()
    assert "feature_extractor_type" not in saved and saved["size"] == {"height": 384, "width": 384}


def test_missing_or_broken_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        Mask2FormerImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        Mask2FormerImageProcessor.from_pretrained(tmp_path)


def test_encode_inputs_equals_preprocess_without_resize_rescale_normalize():
    images = [torch.from_numpy(image).permute(2, 0, 1).float() for image in _images()]
    maps = _semantic_maps()
    processor = Mask2FormerImageProcessor()
    encoded = processor.encode_inputs(images, maps, ignore_index=255, do_reduce_labels=True)
    reference = transformers.Mask2FormerImageProcessor(do_resize=False, do_rescale=False, do_normalize=False,
                                                       ignore_index=255, do_reduce_labels=True)(
        images, segmentation_maps=maps, return_tensors="pt")
    _assert_same_encoding(reference, encoded)


def test_mismatched_map_and_image_sizes_are_rejected_with_both_shapes():
    images, maps = _images()[:2], _semantic_maps()[:2]
    with pytest.raises(ValueError, match=r"\(45, 101\)"):
        Mask2FormerImageProcessor()(images, segmentation_maps=[maps[1], maps[0]])


def test_binary_masks_use_ascending_ids_and_drop_ignore_index():
    segmentation_map = torch.tensor([[3, 3, 255], [1, 3, 1]])
    masks, labels = segmentation_map_to_binary_masks(segmentation_map, ignore_index=255)
    assert labels.tolist() == [1, 3]
    assert masks.tolist() == [[[0, 0, 0], [1, 0, 1]], [[1, 1, 0], [0, 1, 0]]]
    with pytest.raises(ValueError, match="ignore_index"):
        segmentation_map_to_binary_masks(segmentation_map, do_reduce_labels=True)
    with pytest.raises(KeyError, match="instance id 3"):
        segmentation_map_to_binary_masks(segmentation_map, {1: 0}, ignore_index=255)


def test_same_shape_images_are_resized_as_one_batch_with_the_same_result():
    images = _images()
    processor = Mask2FormerImageProcessor(size={"height": 64, "width": 64})
    together = processor([images[0], images[2]])["pixel_values"]
    apart = torch.cat([processor(images[0])["pixel_values"], processor(images[2])["pixel_values"]])
    assert torch.equal(together, apart)


def test_batch_feature_moves_tensors_and_keeps_integer_dtypes():
    encoded = Mask2FormerImageProcessor(size={"height": 32, "width": 32}, ignore_index=255)(
        _images()[:2], segmentation_maps=_semantic_maps()[:2])
    moved = encoded.to(torch.float64)
    assert moved.pixel_values.dtype == torch.float64 and moved["mask_labels"][0].dtype == torch.float64
    assert moved.pixel_mask.dtype == torch.int64 and moved["class_labels"][0].dtype == torch.int64
    with pytest.raises(AttributeError):
        encoded.missing_key


def test_channels_last_output_is_refused_rather_than_ignored():
    with pytest.raises(ValueError, match="channels-first"):
        Mask2FormerImageProcessor()(_images()[0], data_format="channels_last")


@pytest.mark.parametrize("settings", [pytest.param({}, id="defaults"),
                                      pytest.param({"size": {"height": 64, "width": 64}}, id="fixed-square"),
                                      pytest.param({"size": {"height": 48, "width": 48}, "resample": 3},
                                                   id="bicubic")])
def test_resize_images_then_normalise_equals_preprocess_exactly(settings):
    """The labeling job's split: resize on CPU workers (uint8), rescale + normalise on the model's device."""
    processor = Mask2FormerImageProcessor(**settings)
    for image in [Image.fromarray(array) for array in _images()]:
        resized = processor.resize_images([image])
        assert len(resized) == 1 and resized[0].dtype == torch.uint8
        whole = processor(image)["pixel_values"]
        assert resized[0].shape == whole.shape[1:]
        split = processor.preprocess(resized[0][None], do_resize=False, input_data_format="channels_first")
        assert torch.equal(split["pixel_values"], whole)  # bit for bit, not within a tolerance
