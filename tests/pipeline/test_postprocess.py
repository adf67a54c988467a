"""Post-processing on the model's device: segments of every task equal m2f_model's three post-processors for the
same logits on the same device (ids, labels, scores, masks), run lengths give pycocotools' own RLE, and the
write stage's rows decode back to those masks."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch
from pycocotools import mask as coco_mask

from m2f_model import post_processing
from pipeline.device_postprocess import PostprocessSettings, segment_batch
from pipeline.inference import _segmented_row
from pipeline.postprocess import segment_records
from pipeline.rle import encode_mask, encode_run_lengths, mask_run_lengths, pack_run_lengths, unpack_run_lengths

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Random logits score classes near 1/labels and panoptic weighs mask probabilities by that score: low
# thresholds keep segments in every task.
LOW = {"threshold": 0.05, "mask_threshold": 0.5, "overlap_threshold": 0.2}
TARGET_SIZES = [(50, 70), (33, 41)]


def random_outputs(seed: int, *, batch: int = 2, queries: int = 10, labels: int = 6, height: int = 24,
                   width: int = 32, device: str = "cpu") -> SimpleNamespace:
    """Logits shaped like a model's, with confident queries and smooth masks, so every task has segments."""
    generator = torch.Generator().manual_seed(seed)
    class_logits = torch.randn(batch, queries, labels + 1, generator=generator)
    chosen = torch.randint(0, labels, (batch, queries), generator=generator)
    confident = (torch.rand(batch, queries, generator=generator) < 0.5).float() * 6.0
    class_logits.scatter_add_(2, chosen[..., None], confident[..., None])
    coarse = torch.randn(batch * queries, 1, height // 4, width // 4, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    mask_logits = 3.0 * smooth.view(batch, queries, height, width) + 0.5 * torch.randn(
        batch, queries, height, width, generator=generator)
    return SimpleNamespace(class_queries_logits=class_logits.to(device), masks_queries_logits=mask_logits.to(device))


def expected_segments(outputs, sizes, settings: PostprocessSettings) -> list[dict]:
    """Per image {(task, segment_id): (label_id, score, mask)} from the three public post-processors, each image
    post-processed alone (as single-image inference would)."""
    images = []
    for index, size in enumerate(sizes):
        alone = SimpleNamespace(class_queries_logits=outputs.class_queries_logits[index:index + 1],
                                masks_queries_logits=outputs.masks_queries_logits[index:index + 1])
        common = {"threshold": settings.threshold, "mask_threshold": settings.mask_threshold,
                  "overlap_mask_area_threshold": settings.overlap_threshold, "target_sizes": [size]}
        panoptic = post_processing.post_process_panoptic_segmentation(
            alone, label_ids_to_fuse=set(settings.label_ids_to_fuse), unique_segment_ids=True, **common)[0]
        instance = post_processing.post_process_instance_segmentation(alone, return_binary_maps=True, **common)[0]
        semantic = post_processing.post_process_semantic_segmentation(alone, target_sizes=[size])[0]
        segments = {}
        panoptic_map = panoptic["segmentation"].cpu().numpy()
        for info in panoptic["segments_info"]:
            previous = segments.get(("panoptic", info["id"]))
            score = info["score"] if previous is None else max(previous[1], info["score"])
            segments[("panoptic", info["id"])] = (info["label_id"], score, panoptic_map == info["id"])
        maps = instance["segmentation"].cpu().numpy()
        for position, info in enumerate(instance["segments_info"]):
            segments[("instance", info["id"])] = (info["label_id"], info["score"], maps[position] > 0.5)
        label_map = semantic.cpu().numpy()
        for label in np.unique(label_map):
            segments[("semantic", int(label))] = (int(label), None, label_map == label)
        images.append(segments)
    return images


def decoded(runs: np.ndarray, height: int, width: int) -> np.ndarray:
    rle = coco_mask.frPyObjects([{"size": [height, width], "counts": runs}], height, width)[0]
    return coco_mask.decode(rle).astype(bool)


def assert_segments_equal(images, expected) -> None:
    for image, wanted in zip(images, expected):
        got = {}
        for k, task in enumerate(image.task):
            got[(task, image.segment_id[k])] = (image.label_id[k], image.score[k],
                                                decoded(image.run_lengths[k], image.height, image.width))
        assert sorted(got) == sorted(wanted)
        for key, (label_id, score, mask) in wanted.items():
            assert got[key][0] == label_id and got[key][1] == score, key
            assert np.array_equal(got[key][2], mask), key
        for k in range(len(image.task)):  # the model stage's area and box are pycocotools' own
            reference = coco_mask.encode(np.asfortranarray(decoded(image.run_lengths[k], image.height,
                                                                   image.width).astype(np.uint8)))
            assert image.area[k] == coco_mask.area(reference), k
            assert image.bbox[k].tolist() == coco_mask.toBbox(reference).tolist(), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed, fuse", [(0, ()), (1, (0, 1, 2)), (2, (3,))])
def test_segments_equal_the_three_post_processors_on_the_same_device(device, seed, fuse):
    outputs = random_outputs(seed, device=device)
    settings = PostprocessSettings(**LOW, label_ids_to_fuse=fuse)
    images = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, TARGET_SIZES, settings)
    expected = expected_segments(outputs, TARGET_SIZES, settings)
    assert all({task for task, _ in image} == {"panoptic", "instance", "semantic"} for image in expected)
    assert_segments_equal(images, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_coco_shaped_head_segments_equal_the_post_processors(device):
    # 100 queries and 133 labels, as a COCO panoptic checkpoint; default thresholds.
    outputs = random_outputs(5, batch=2, queries=100, labels=133, height=48, width=64, device=device)
    outputs.class_queries_logits[:, :, :-1] *= 3.0
    settings = PostprocessSettings(threshold=0.3)
    images = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, [(96, 128), (61, 77)],
                           settings)
    expected = expected_segments(outputs, [(96, 128), (61, 77)], settings)
    assert sum(task == "instance" for image in expected for task, _ in image) > 0
    assert_segments_equal(images, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_targets_larger_than_the_working_size_equal_the_post_processors(device):
    """Instance masks are then read off the 384x384 working masks (no upsampled copy): same segments."""
    outputs = random_outputs(3, batch=2, queries=12, labels=6, device=device)
    settings = PostprocessSettings(**LOW)
    sizes = [(480, 640), (384, 401)]
    images = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, sizes, settings)
    expected = expected_segments(outputs, sizes, settings)
    assert all(sum(task == "instance" for task, _ in image) > 1 for image in expected)
    assert_segments_equal(images, expected)


def test_tasks_option_limits_what_is_produced():
    outputs = random_outputs(0)
    images = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, TARGET_SIZES,
                           PostprocessSettings(tasks=("semantic",), **LOW))
    assert all(set(image.task) == {"semantic"} and all(s is None for s in image.score) for image in images)


def test_a_reused_fused_id_never_gives_two_labels_one_panoptic_segment():
    # Queries in order: label 0 (fused), label 1, label 0 again (reuses the fused id), label 2. transformers'
    # numbering gives the last one the id of the label-1 segment; each query owns one quadrant here.
    class_logits = torch.full((1, 4, 4), -10.0)  # (batch, queries, 3 labels + no-object)
    for query, label in enumerate((0, 1, 0, 2)):
        class_logits[0, query, label] = 10.0
    mask_logits = torch.full((1, 4, 8, 8), -10.0)
    for query, (rows, cols) in enumerate(((slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                                         (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8)))):
        mask_logits[0, query, rows, cols] = 10.0
    image = segment_batch(class_logits, mask_logits, [(32, 32)],
                          PostprocessSettings(tasks=("panoptic",), label_ids_to_fuse=(0,)))[0]
    assert sorted(image.label_id) == [0, 1, 2] and len(set(image.segment_id)) == 3
    masks = [decoded(runs, 32, 32) for runs in image.run_lengths]
    assert np.sum(masks, axis=0).min() == 1  # every pixel in exactly one segment
    assert masks[image.label_id.index(0)].sum() == 2 * 16 * 16 and image.was_fused[image.label_id.index(0)]


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (128, 3)])
def test_run_lengths_give_pycocotools_own_rle_area_and_box(shape):
    rng = np.random.default_rng(sum(shape))
    for mask in (rng.random(shape) > 0.6, np.ones(shape, bool), np.zeros(shape, bool)):
        reference = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
        encoded = encode_mask(mask)
        assert encoded["counts"] == reference["counts"].decode("ascii") and encoded["size"] == list(shape)
        assert encoded["area"] == mask.sum() == coco_mask.area(reference)
        assert encoded["bbox"] == [float(v) for v in coco_mask.toBbox(reference)]


def test_packed_run_lengths_round_trip_long_runs_included():
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 2 ** 30, size=500).astype(np.uint32)
    counts[rng.random(500) < 0.8] %= 70_000  # mostly short, some just above and below the 16-bit escape
    counts[:6] = [0, 0xFFFE, 0xFFFF, 0x10000, 0x17FFF, 2 ** 30 - 1]
    packed = pack_run_lengths(counts)
    assert np.array_equal(unpack_run_lengths(packed), counts)
    # a view into a larger buffer at an odd offset, as a binary column hands it over
    assert np.array_equal(unpack_run_lengths(np.frombuffer(b"x" + packed, np.uint8)[1:]), counts)
    short = rng.integers(0, 0xFFFF, size=1000).astype(np.uint32)
    assert len(pack_run_lengths(short)) == 2 * short.size  # half of uint32
    with pytest.raises(ValueError, match="too long"):
        pack_run_lengths(np.array([2 ** 30], np.uint32))


def test_device_run_lengths_match_dense_encoding_at_the_edges():
    # A mask on the first and last pixels (runs that start at 0 and end at the last pixel), and a label map.
    label_map = torch.zeros((1, 1, 6, 5))
    label_map[0, 0, 0, 0] = label_map[0, 0, -1, -1] = 1.0
    outputs = SimpleNamespace(class_queries_logits=torch.tensor([[[10.0, -10.0]]]),
                              masks_queries_logits=label_map * 20 - 10)
    image = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, [(6, 5)],
                          PostprocessSettings(tasks=("instance", "semantic")))[0]
    for k, task in enumerate(image.task):
        mask = decoded(image.run_lengths[k], 6, 5)
        assert np.array_equal(image.run_lengths[k], mask_run_lengths(mask)), task


def test_segment_records_carry_labels_provenance_and_decodable_rle():
    outputs = random_outputs(1)
    image = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, TARGET_SIZES[:1] * 2,
                          PostprocessSettings(**LOW))[0]
    row = _segmented_row({"image_uri": "/x.png", "image_id": "x.png", "height": image.height,
                          "width": image.width}, segments=image)
    labels = {k: f"label-{k}" for k in range(6)}
    records = segment_records(row, np.concatenate(image.run_lengths), id2label=labels, model="m@abc", run_id="r")
    assert len(records) == len(image.task) > 0
    for k, record in enumerate(records):
        rle = {"size": record.rle_size, "counts": record.rle_counts.encode()}
        mask = coco_mask.decode(rle).astype(bool)
        assert np.array_equal(mask, decoded(image.run_lengths[k], image.height, image.width))
        assert record.label == f"label-{record.label_id}" and record.area == mask.sum() == coco_mask.area(rle)
        assert record.bbox == coco_mask.toBbox(rle).tolist()
        assert (record.model, record.run_id, record.task) == ("m@abc", "r", image.task[k])


def test_no_segments_give_no_rle():
    assert encode_run_lengths([], height=3, width=4) == []


def test_unknown_task_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="panoptic,instance,semantic"):
        PostprocessSettings(tasks=("panoptic", "depth"))


def test_device_counts_equal_each_masks_own_run_lengths():
    """Binary masks (as instance masks) and the values of a label map (as panoptic and semantic segments), all
    at once on the device: each segment gets its own COCO counts, empty masks and edge pixels included."""
    from pipeline.device_postprocess import (_areas_and_boxes, _coco_counts, _label_map_ones, _run_table,
                                             _run_table_lengths)

    rng = np.random.default_rng(5)
    height, width = 9, 7
    masks = [rng.random((height, width)) < 0.4, np.ones((height, width), bool), np.zeros((height, width), bool)]
    for y, x in ((0, 0), (height - 1, width - 1), (4, 3)):
        masks.append(np.zeros((height, width), bool))
        masks[-1][y, x] = True
    table = _run_table(torch.from_numpy(np.stack(masks).astype(np.uint8)))
    lengths = _run_table_lengths(table, height * width)
    ones = table[:, 2] == 1
    mask_rows = torch.stack([table[ones, 0].long(), table[ones, 1].long(), lengths[ones]], dim=1)
    label_map = rng.integers(0, 4, (height, width))
    label_map[label_map == 2] = 1  # value 2 absent: an empty segment
    values = [3, 0, 2, 1]  # any order: segments are numbered in this order
    map_rows, _ = _label_map_ones(torch.from_numpy(label_map), values, first_segment=len(masks))
    present_rows, present = _label_map_ones(torch.from_numpy(label_map), None, first_segment=len(masks) + 4)
    assert present.tolist() == [0, 1, 3]
    expected = [mask_run_lengths(mask) for mask in masks] + [mask_run_lengths(label_map == v)
                                                             for v in values + [0, 1, 3]]
    pixels = torch.full((len(expected),), height * width)
    rows = torch.cat([mask_rows, map_rows, present_rows])
    counts, runs = _coco_counts(rows, pixels)
    assert runs.tolist() == [len(e) for e in expected]
    assert counts.tolist() == np.concatenate(expected).tolist()
    area, box = _areas_and_boxes(rows, torch.full((len(expected),), height))
    rles = coco_mask.frPyObjects([{"size": [height, width], "counts": e} for e in expected], height, width)
    assert area.tolist() == coco_mask.area(rles).tolist()
    assert box.tolist() == coco_mask.toBbox(rles).tolist()  # a run across columns spans every row, empty: zeros
    assert any(b[3] == height and b[2] > 1 for b in box.tolist())


@pytest.mark.parametrize("small, size", [((7, 5), (7, 5)), ((7, 5), (8, 5)), ((7, 5), (7, 13)), ((6, 9), (40, 31)),
                                         ((1, 1), (3, 4)), ((12, 12), (15, 20))])
def test_upsampled_run_table_equals_the_run_table_of_the_upsampled_masks(small, size):
    from pipeline.device_postprocess import _run_table, _upsampled_run_table

    rng = np.random.default_rng(sum(small) + sum(size))
    masks = [rng.random(small) < 0.4, np.ones(small, bool), np.zeros(small, bool), rng.random(small) < 0.9]
    corner = np.zeros(small, bool)
    corner[-1, -1] = True
    stack = torch.from_numpy(np.stack(masks + [corner]).astype(np.uint8))
    upsampled = torch.nn.functional.interpolate(stack[None], size=size, mode="nearest")[0]
    assert torch.equal(_upsampled_run_table(stack, size), _run_table(upsampled))
    assert _upsampled_run_table(stack[:0], size).shape == (0, 3)


def test_packed_words_escape_a_long_count_as_its_high_and_low_15_bits():
    counts = np.array([5, 70_000, 3, 0xFFFF, 0xFFFF], np.uint32)
    words = np.frombuffer(pack_run_lengths(counts), np.uint16)
    assert words.tolist() == [5, 0xFFFF, 70_000 >> 15, 70_000 & 0x7FFF, 3, 0xFFFF, 1, 0x7FFF, 0xFFFF, 1, 0x7FFF]


def test_write_stage_rows_keep_each_image_and_error_in_order(tmp_path):
    import pyarrow.parquet as pq

    from pipeline.postprocess import PostprocessStage
    from pipeline.records import SEGMENTED_SCHEMA, StageError
    from pipeline.storage import StorageConfig

    outputs = random_outputs(2)
    images = segment_batch(outputs.class_queries_logits, outputs.masks_queries_logits, TARGET_SIZES,
                           PostprocessSettings(**LOW))
    rows = [_segmented_row({"image_uri": f"/{name}.png", "image_id": f"{name}.png", "height": image.height,
                            "width": image.width}, segments=image) for name, image in zip("ab", images)]
    broken = {**rows[0], "image_uri": "/c.png", "image_id": "c.png", "segment_runs": [1] * len(rows[0]["segment_runs"])}
    failed = _segmented_row({"image_uri": "/d.png", "image_id": "d.png"},
                            error=StageError("decode", "ImageDecodeError", "not an image"))
    empty = {**rows[1], "image_uri": "/e.png", "image_id": "e.png", "segment_task": [], "segment_id": [],
             "segment_label_id": [], "segment_score": [], "segment_was_fused": [], "segment_runs": [],
             "segment_area": [], "segment_bbox": [], "run_lengths": b""}
    batch = pa.Table.from_pylist([rows[0], failed, broken, rows[1], empty], schema=SEGMENTED_SCHEMA)
    spec = SimpleNamespace(id2label={k: f"label-{k}" for k in range(3)}, model_id="m@abc")
    stage = PostprocessStage(spec=spec, storage=StorageConfig.resolve({}, environ={}), output_uri=str(tmp_path),
                             tasks=("panoptic", "instance", "semantic"), run_id="r")
    written_images = stage(batch)
    assert written_images["status"].to_pylist() == ["ok", "error", "error", "ok", "ok"]
    assert written_images["error_stage"].to_pylist() == [None, "decode", "postprocess", None, None]
    for task in ("panoptic", "instance", "semantic"):
        assert written_images[f"{task}_segments"].to_pylist() == [
            images[0].task.count(task), None, None, images[1].task.count(task), 0]
    segments = pq.read_table(tmp_path / "segments")
    expected = [record.__dict__ for row, image in zip(rows, images)
                for record in segment_records(row, np.concatenate(image.run_lengths),
                                              id2label=spec.id2label, model="m@abc", run_id="r")]
    assert segments.to_pylist() == expected
    assert [s["label"] for s in expected] == [f"label-{k}" if k < 3 else str(k) for k in
                                              images[0].label_id + images[1].label_id]
