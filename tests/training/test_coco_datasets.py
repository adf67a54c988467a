"""COCO instance / COCO panoptic / semantic-map training datasets built from tiny hand-made files.

Every dataset here is written by the test itself (numpy + PIL), with shapes at known places, so the expected
mask_labels / class_labels are known without running the code under test.
"""
from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from m2f_model import Mask2FormerConfig, Mask2FormerImageProcessor
from m2f_model.loss import Mask2FormerLoss
from training import ScaleCropFlip, collate_segmentation_batch, load_coco_dataset, load_semantic_dataset

HEIGHT, WIDTH = 32, 64  # multiples of 32: the processor rounds sizes up to them
IGNORE_INDEX = 255
# Deliberately unsorted and non-contiguous: labels follow ascending COCO id -> 3: 0, 7: 1, 12: 2.
THING_CATEGORIES = [{"id": 7, "name": "square"}, {"id": 3, "name": "circle"}, {"id": 12, "name": "triangle"}]


@pytest.fixture
def ds_processor():
    """An identity-size processor: images are HEIGHT x WIDTH, so targets come out at the pixels we drew."""
    return Mask2FormerImageProcessor(size={"height": HEIGHT, "width": WIDTH}, ignore_index=IGNORE_INDEX,
                                     num_labels=5)


def box_mask(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [HEIGHT, WIDTH], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a run of zeros, as COCO writes crowd masks."""
    flat = mask.flatten(order="F").astype(np.uint8)
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return {"size": [HEIGHT, WIDTH], "counts": counts}


def save_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(path)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))


def targets_by_class(item: dict) -> dict[int, list[np.ndarray]]:
    found: dict[int, list[np.ndarray]] = {}
    for mask, label in zip(item["mask_labels"], item["class_labels"]):
        found.setdefault(int(label), []).append(mask.numpy().astype(bool))
    return found


def write_instance_dataset(root: Path, annotations: list[dict], *, images: list[dict] | None = None,
                           files: tuple[str, ...] = ("a.png", "b.png")) -> Path:
    for seed, name in enumerate(files):
        save_image(root / "train" / name, seed)
    images = images if images is not None else [
        {"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
        {"id": 2, "file_name": "b.png", "height": HEIGHT, "width": WIDTH}]
    write_json(root / "annotations" / "instances_train.json",
               {"images": images, "annotations": annotations, "categories": THING_CATEGORIES})
    return root


def test_instance_dataset_decodes_polygon_rle_and_uncompressed_rle_to_the_drawn_masks(tmp_path, ds_processor):
    square = box_mask(2, 3, 12, 15)
    circle_like = box_mask(20, 30, 30, 44)
    triangle_polygon = [[4.0, 16.0, 24.0, 16.0, 4.0, 30.0]]  # right triangle, corner at (x=4, y=16)
    root = write_instance_dataset(tmp_path, [
        {"id": 10, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": compressed_rle(square)},
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": uncompressed_rle(circle_like)},
        {"id": 12, "image_id": 1, "category_id": 12, "iscrowd": 0, "segmentation": triangle_polygon},
    ])
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="instance")

    assert dataset.id2label == {0: "circle", 1: "square", 2: "triangle"}
    assert dataset.label2id == {"circle": 0, "square": 1, "triangle": 2}
    assert dataset.category_ids == [3, 7, 12]
    assert len(dataset) == 2 and not dataset.skipped

    item = dataset[0]
    assert item["image_id"] == 1
    assert item["pixel_values"].shape == (3, HEIGHT, WIDTH) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_mask"].shape == (HEIGHT, WIDTH) and item["pixel_mask"].dtype == torch.int64
    assert item["class_labels"].dtype == torch.int64
    targets = targets_by_class(item)
    assert sorted(targets) == [0, 1, 2]
    assert np.array_equal(targets[1][0], square)
    assert np.array_equal(targets[0][0], circle_like)
    triangle = targets[2][0]
    # Inside the triangle (x - 4) / 20 + (y - 16) / 14 < 1, away from its edges, every pixel is set ...
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    inside = ((xs - 4) / 20 + (ys - 16) / 14 < 0.85) & (xs >= 5) & (ys >= 17)
    outside = ((xs - 4) / 20 + (ys - 16) / 14 > 1.15) | (xs < 3) | (ys < 15)
    assert triangle[inside].all() and not triangle[outside].any()
    # ... and the masks are not mixed up: the square's pixels hold class "square" only.
    assert not triangle[square].any()

    empty_image_item = dataset[1]
    assert empty_image_item["mask_labels"].shape == (0, HEIGHT, WIDTH)
    assert empty_image_item["class_labels"].shape == (0,)


def test_overlapping_instances_keep_the_smaller_one_on_top(tmp_path, ds_processor):
    large = box_mask(0, 0, 30, 40)
    small = box_mask(10, 10, 20, 20)
    root = write_instance_dataset(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": compressed_rle(small)},
        {"id": 2, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": compressed_rle(large)},
    ])
    targets = targets_by_class(load_coco_dataset(str(root), "train", processor=ds_processor, task="instance")[0])
    assert np.array_equal(targets[0][0], small)
    assert np.array_equal(targets[1][0], large & ~small)


def test_bad_instance_annotations_are_skipped_and_counted_with_the_culprit_named(tmp_path, ds_processor):
    good = box_mask(2, 2, 10, 10)
    root = write_instance_dataset(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": compressed_rle(good)},
        {"id": 2, "image_id": 1, "category_id": 99, "iscrowd": 0, "segmentation": compressed_rle(good)},
        {"id": 3, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": compressed_rle(np.zeros((HEIGHT, WIDTH), bool))},
        {"id": 4, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[1.0, 2.0, 3.0, 4.0]]},
        {"id": 5, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [HEIGHT + 1, WIDTH], "counts": "abc"}},
        {"id": 6, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": {"size": [HEIGHT, WIDTH], "counts": [5, 3]}},
        {"id": 7, "image_id": 1, "category_id": 7, "iscrowd": 1, "segmentation": uncompressed_rle(good)},
        {"id": 8, "image_id": 3, "category_id": 7, "iscrowd": 0, "segmentation": compressed_rle(good)},
        {"id": 9, "image_id": 404, "category_id": 7, "iscrowd": 0, "segmentation": compressed_rle(good)},
    ], images=[
        {"id": 1, "file_name": "a.png", "height": HEIGHT, "width": WIDTH},
        {"id": 3, "file_name": "gone.png", "height": HEIGHT, "width": WIDTH},
    ], files=("a.png",))
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="instance")

    assert len(dataset) == 1
    assert dict(dataset.skipped.counts) == {
        "unknown category id": 1, "empty mask": 1, "malformed segmentation": 3, "missing image file": 1,
        "crowd annotation (left out of targets)": 1, "annotation of an unknown image": 1}
    summary = str(dataset.skipped)
    assert "gone.png" in summary and "category_id 99" in summary and "annotation 2 " in summary
    assert "annotation 3 of a.png covers no pixel" in summary
    assert "annotation 9 has image_id 404" in summary
    item = dataset[0]
    assert item["class_labels"].tolist() == [1]
    assert np.array_equal(item["mask_labels"][0].numpy().astype(bool), good)


def test_bad_instance_annotation_raises_naming_it_when_asked_to(tmp_path, ds_processor):
    root = write_instance_dataset(tmp_path, [
        {"id": 42, "image_id": 1, "category_id": 7, "iscrowd": 0, "segmentation": [[1.0, 2.0, 3.0, 4.0]]}])
    with pytest.raises(ValueError, match=r"malformed segmentation: annotation 42 of a.png"):
        load_coco_dataset(str(root), "train", processor=ds_processor, task="instance", on_bad_annotation="raise")


def test_missing_annotation_file_names_the_expected_path(tmp_path, ds_processor):
    with pytest.raises(FileNotFoundError, match=r"annotations/panoptic_val.json does not exist"):
        load_coco_dataset(str(tmp_path), "val", processor=ds_processor)


def write_panoptic_dataset(root: Path, panoptic_ids: np.ndarray, segments_info: list[dict], *,
                           write_png: bool = True) -> Path:
    save_image(root / "train" / "a.jpg")
    png_dir = root / "annotations" / "panoptic_train"
    png_dir.mkdir(parents=True, exist_ok=True)
    if write_png:
        rgb = np.stack([panoptic_ids % 256, (panoptic_ids // 256) % 256, panoptic_ids // 65536], axis=-1)
        Image.fromarray(rgb.astype(np.uint8)).save(png_dir / "a.png")
    categories = [{"id": 3, "name": "circle", "isthing": 1}, {"id": 7, "name": "square", "isthing": 1},
                  {"id": 20, "name": "sky", "isthing": 0}, {"id": 21, "name": "ground", "isthing": 0}]
    write_json(root / "annotations" / "panoptic_train.json", {
        "images": [{"id": 5, "file_name": "a.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": [{"image_id": 5, "file_name": "a.png", "segments_info": segments_info}],
        "categories": categories})
    return root


def test_panoptic_dataset_reads_segment_ids_from_all_three_colour_channels(tmp_path, ds_processor):
    sky, ground = box_mask(0, 0, 16, WIDTH), box_mask(16, 0, HEIGHT, WIDTH)
    thing_a, thing_b, unlabeled = box_mask(4, 4, 12, 12), box_mask(18, 30, 28, 40), box_mask(28, 0, HEIGHT, 8)
    # 70000 needs the blue channel (70000 = 112 + 256 * 17 + 65536 * 1); 300 needs green.
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    ids[sky], ids[ground], ids[thing_a], ids[thing_b], ids[unlabeled] = 70000, 300, 5, 6, 0
    root = write_panoptic_dataset(tmp_path, ids, [
        {"id": 70000, "category_id": 20, "iscrowd": 0, "area": 1},
        {"id": 300, "category_id": 21, "iscrowd": 0, "area": 1},
        {"id": 5, "category_id": 7, "iscrowd": 0, "area": 1},
        {"id": 6, "category_id": 3, "iscrowd": 1, "area": 1},
    ])
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="panoptic")

    assert dataset.id2label == {0: "circle", 1: "square", 2: "sky", 3: "ground"}
    assert dataset.categories.thing_label_ids == [0, 1] and dataset.categories.stuff_label_ids == [2, 3]
    item = dataset[0]
    assert item["image_id"] == 5
    targets = targets_by_class(item)
    assert sorted(targets) == [1, 2, 3]  # the crowd circle is no target
    assert np.array_equal(targets[1][0], thing_a)
    assert np.array_equal(targets[2][0], sky & ~thing_a)
    assert np.array_equal(targets[3][0], ground & ~thing_b & ~unlabeled)
    assert dict(dataset.skipped.counts) == {"crowd annotation (left out of targets)": 1}


def test_bad_panoptic_segments_are_skipped_and_counted(tmp_path, ds_processor):
    ids = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    ids[box_mask(0, 0, 16, WIDTH)] = 1
    ids[box_mask(16, 0, HEIGHT, WIDTH)] = 2
    ids[box_mask(4, 4, 12, 12)] = 3
    root = write_panoptic_dataset(tmp_path, ids, [
        {"id": 1, "category_id": 20, "iscrowd": 0, "area": 1},
        {"id": 2, "category_id": 55, "iscrowd": 0, "area": 1},  # unknown category
        {"id": 9, "category_id": 7, "iscrowd": 0, "area": 1},  # listed, but not in the PNG
        {"id": 4, "category_id": 7, "iscrowd": 0, "area": 0},  # zero area
    ])  # id 3 is in the PNG but not listed
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="panoptic")
    assert dict(dataset.skipped.counts) == {"unknown category id": 1, "empty mask": 1}
    item = dataset[0]
    assert item["class_labels"].tolist() == [2]
    assert np.array_equal(item["mask_labels"][0].numpy().astype(bool), ids == 1)
    assert dict(dataset.skipped.counts) == {"unknown category id": 1, "empty mask": 2, "PNG id without a segment": 1}
    assert "segment 9 of a.png has no pixel" in str(dataset.skipped)
    assert "ids [3] in a.png" in str(dataset.skipped)


def test_panoptic_image_without_its_png_is_skipped_with_the_png_named(tmp_path, ds_processor):
    root = write_panoptic_dataset(tmp_path, np.ones((HEIGHT, WIDTH), np.int64),
                                  [{"id": 1, "category_id": 20, "iscrowd": 0, "area": 1}], write_png=False)
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="panoptic")
    assert len(dataset) == 0
    assert dict(dataset.skipped.counts) == {"missing panoptic PNG": 1}
    assert "annotations/panoptic_train/a.png" in str(dataset.skipped)


def write_semantic_dataset(root: Path, labels: np.ndarray) -> Path:
    save_image(root / "images" / "training" / "scene.jpg")
    (root / "annotations" / "training").mkdir(parents=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(root / "annotations" / "training" / "scene.png")
    save_image(root / "images" / "training" / "unlabelled.jpg")
    return root


def test_semantic_maps_with_reduce_labels_turn_zero_into_unlabeled_and_shift_the_rest(tmp_path, ds_processor):
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)  # 0 = "other" in ADE20K
    labels[box_mask(0, 0, 16, WIDTH)] = 1
    labels[box_mask(20, 20, 30, 30)] = 3
    labels[box_mask(0, 40, 4, WIDTH)] = 9  # beyond the 3 labels of id2label
    root = write_semantic_dataset(tmp_path, labels)
    dataset = load_semantic_dataset(str(root), "training", processor=ds_processor, reduce_labels=True,
                                    id2label={0: "wall", 1: "floor", 2: "tree"})
    assert len(dataset) == 1
    assert dict(dataset.skipped.counts) == {"missing label map": 1}
    targets = targets_by_class(dataset[0])
    assert sorted(targets) == [0, 2]
    assert np.array_equal(targets[0][0], labels == 1)
    assert np.array_equal(targets[2][0], labels == 3)
    assert dataset.skipped.counts["unknown label values"] == 1
    assert "values [9]" in str(dataset.skipped)


def test_semantic_maps_without_reduce_labels_keep_zero_as_a_class(tmp_path, ds_processor):
    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[box_mask(0, 0, 16, WIDTH)] = 2
    dataset = load_semantic_dataset(str(write_semantic_dataset(tmp_path, labels)), "training",
                                    processor=ds_processor, id2label={0: "a", 1: "b", 2: "c"})
    targets = targets_by_class(dataset[0])
    assert sorted(targets) == [0, 2]
    assert np.array_equal(targets[0][0], labels == 0)


def test_collate_pads_images_and_masks_to_the_batch_maximum(tmp_path):
    def item(height: int, width: int, count: int, image_id: int) -> dict:
        return {"pixel_values": torch.ones(3, height, width),
                "pixel_mask": torch.ones(height, width, dtype=torch.int64),
                "mask_labels": torch.ones(count, height, width), "class_labels": torch.arange(count),
                "image_id": image_id}

    batch = collate_segmentation_batch([item(20, 30, 2, 1), item(24, 16, 0, 2)])
    assert batch["pixel_values"].shape == (2, 3, 24, 30)
    assert batch["pixel_mask"].dtype == torch.int64
    assert batch["pixel_mask"][0].sum() == 20 * 30 and batch["pixel_mask"][1].sum() == 24 * 16
    assert batch["pixel_values"][0, :, 20:].abs().sum() == 0 and batch["pixel_values"][1, :, :, 16:].abs().sum() == 0
    assert [masks.shape for masks in batch["mask_labels"]] == [(2, 24, 30), (0, 24, 30)]
    assert batch["mask_labels"][0][:, :20, :30].all() and batch["mask_labels"][0][:, 20:].sum() == 0
    assert [labels.tolist() for labels in batch["class_labels"]] == [[0, 1], []]
    assert batch["image_ids"] == [1, 2]


def test_augmented_batches_from_the_dataset_feed_the_loss(tmp_path, ds_processor):
    root = write_instance_dataset(tmp_path, [
        {"id": 1, "image_id": 1, "category_id": 7, "iscrowd": 0,
         "segmentation": compressed_rle(box_mask(2, 2, 20, 20))},
        {"id": 2, "image_id": 2, "category_id": 3, "iscrowd": 0,
         "segmentation": compressed_rle(box_mask(5, 5, 9, 40))},
    ])
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="instance",
                                augmentation=ScaleCropFlip(min_scale=0.8, max_scale=1.5, crop_size=(24, 40), seed=3))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_segmentation_batch)
    batch = next(iter(loader))
    num_queries = 6
    masks_logits = torch.randn(2, num_queries, HEIGHT // 4, WIDTH // 4, requires_grad=True)
    class_logits = torch.randn(2, num_queries, len(dataset.id2label) + 1, requires_grad=True)
    criterion = Mask2FormerLoss(Mask2FormerConfig(num_labels=len(dataset.id2label), train_num_points=64),
                                {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0})
    losses = criterion(masks_logits, class_logits, batch["mask_labels"], batch["class_labels"])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total) and masks_logits.grad.abs().sum() > 0
    assert sum(len(labels) for labels in batch["class_labels"]) >= 1


@pytest.fixture(scope="module")
def ds_s3_endpoint(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 for this module (a few seconds to start)."""
    repository_root = str(Path(__file__).resolve().parents[2])
    if repository_root not in sys.path:  # infra/ is not an installed package
        sys.path.insert(0, repository_root)
    from infra.local_stack import start_s3_endpoint, stop_s3_endpoint

    endpoint = start_s3_endpoint(log_dir=tmp_path_factory.mktemp("ds-moto"))
    yield endpoint
    stop_s3_endpoint(endpoint)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["instance", "panoptic"])
def test_dataset_on_s3_gives_the_same_items_as_the_local_copy(tmp_path, ds_processor, ds_s3_endpoint, task):
    import s3fs

    ids = np.ones((HEIGHT, WIDTH), dtype=np.int64)
    ids[box_mask(4, 4, 12, 12)] = 2
    write_panoptic_dataset(tmp_path, ids, [{"id": 1, "category_id": 20, "iscrowd": 0, "area": 1},
                                           {"id": 2, "category_id": 7, "iscrowd": 0, "area": 1}])
    write_json(tmp_path / "annotations" / "instances_train.json", {
        "images": [{"id": 5, "file_name": "a.jpg", "height": HEIGHT, "width": WIDTH}],
        "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "iscrowd": 0,
                         "segmentation": compressed_rle(ids == 2)}],
        "categories": THING_CATEGORIES})
    storage_options = ds_s3_endpoint.storage_options()
    filesystem = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)
    bucket = f"ds-{task}"
    filesystem.mkdir(bucket)
    filesystem.put(f"{tmp_path}/", f"{bucket}/shapes", recursive=True)

    remote = load_coco_dataset(f"s3://{bucket}/shapes", "train", processor=ds_processor, task=task,
                               storage_options=storage_options)
    local = load_coco_dataset(str(tmp_path), "train", processor=ds_processor, task=task)
    assert len(remote) == len(local) == 1 and not remote.skipped
    remote_item, local_item = remote[0], local[0]
    for key in ("pixel_values", "pixel_mask", "mask_labels", "class_labels"):
        assert torch.equal(remote_item[key], local_item[key]), key
    assert sorted(remote_item["class_labels"].tolist()) == ([1] if task == "instance" else [1, 2])

    # A DataLoader worker forked after the parent used the S3 filesystem, and a pickled copy (Ray), read too.
    loader = torch.utils.data.DataLoader(remote, batch_size=1, num_workers=1, collate_fn=collate_segmentation_batch)
    assert torch.equal(next(iter(loader))["pixel_values"][0], local_item["pixel_values"])
    assert torch.equal(pickle.loads(pickle.dumps(remote))[0]["mask_labels"], local_item["mask_labels"])

    filesystem.rm(f"{bucket}/shapes/train/a.jpg")
    missing = load_coco_dataset(f"s3://{bucket}/shapes", "train", processor=ds_processor, task=task,
                                storage_options=storage_options)
    assert len(missing) == 0 and f"s3://{bucket}/shapes/train/a.jpg" in str(missing.skipped)


def test_items_match_those_made_with_the_transformers_processor(tmp_path, ds_processor):
    import transformers

    ids = np.ones((HEIGHT, WIDTH), dtype=np.int64)
    ids[box_mask(4, 4, 12, 12)] = 2
    root = write_panoptic_dataset(tmp_path, ids, [{"id": 1, "category_id": 20, "iscrowd": 0, "area": 1},
                                                  {"id": 2, "category_id": 7, "iscrowd": 0, "area": 1}])
    reference_processor = transformers.Mask2FormerImageProcessor(size={"height": 64, "width": 96},
                                                                 ignore_index=IGNORE_INDEX)
    our_processor = Mask2FormerImageProcessor(size={"height": 64, "width": 96}, ignore_index=IGNORE_INDEX)
    reference_item = load_coco_dataset(str(root), "train", processor=reference_processor)[0]
    our_item = load_coco_dataset(str(root), "train", processor=our_processor)[0]
    assert our_item["pixel_values"].shape == (3, 64, 96)
    torch.testing.assert_close(our_item["pixel_values"], reference_item["pixel_values"], atol=1e-4, rtol=0)
    for key in ("pixel_mask", "mask_labels", "class_labels"):
        assert torch.equal(our_item[key], reference_item[key]), key


def test_a_processor_set_to_reduce_labels_does_not_shift_coco_targets_and_sets_the_semantic_default(tmp_path):
    reducing_processor = Mask2FormerImageProcessor(size={"height": HEIGHT, "width": WIDTH}, ignore_index=IGNORE_INDEX,
                                                   do_reduce_labels=True)
    square = box_mask(2, 3, 12, 15)
    root = write_instance_dataset(tmp_path / "coco", [
        {"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0, "segmentation": compressed_rle(square)}])
    item = load_coco_dataset(str(root), "train", processor=reducing_processor, task="instance")[0]
    assert item["class_labels"].tolist() == [0]
    assert np.array_equal(item["mask_labels"][0].numpy().astype(bool), square)
    assert reducing_processor.do_reduce_labels  # the caller's processor is left as it was

    labels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    labels[square] = 2
    semantic = load_semantic_dataset(str(write_semantic_dataset(tmp_path / "ade", labels)), "training",
                                     processor=reducing_processor, id2label={0: "a", 1: "b"})
    assert semantic.reduce_labels
    semantic_item = semantic[0]
    assert semantic_item["class_labels"].tolist() == [1]
    assert np.array_equal(semantic_item["mask_labels"][0].numpy().astype(bool), square)


def test_unreadable_or_resized_image_files_raise_errors_naming_the_file(tmp_path, ds_processor):
    root = write_instance_dataset(tmp_path, [])
    (root / "train" / "a.png").write_bytes(b"not a png at all")
    Image.fromarray(np.zeros((HEIGHT // 2, WIDTH, 3), dtype=np.uint8)).save(root / "train" / "b.png")
    dataset = load_coco_dataset(str(root), "train", processor=ds_processor, task="instance")
    with pytest.raises(ValueError, match=r"train/a.png could not be decoded as an image"):
        dataset[0]
    with pytest.raises(ValueError, match=r"train/b.png is 64x16 \(WxH\) but .*instances_train.json gives image 2"):
        dataset[1]
