"""Post-processing: COCO RLE round trips at the original size, and segments of all three tasks from one forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from pipeline.postprocess import PostprocessSettings, encode_mask, predict_segments, segment_records
from pipeline_test_images import random_rgb

# A random tiny model scores classes near 1/6 and panoptic weighs mask probabilities by that score: low
# thresholds keep segments in every task.
LOW = {"threshold": 0.05, "mask_threshold": 0.1, "overlap_threshold": 0.5}


@pytest.mark.parametrize("shape", [(37, 53), (1, 1), (128, 3)])
def test_rle_round_trip_keeps_every_pixel_area_and_box(shape):
    rng = np.random.default_rng(sum(shape))
    mask = rng.random(shape) > 0.6
    mask[0, 0] = True
    encoded = encode_mask(mask)
    assert isinstance(encoded["counts"], str) and encoded["size"] == list(shape)
    decoded = coco_mask.decode({"size": encoded["size"], "counts": encoded["counts"]})
    assert decoded.shape == shape and np.array_equal(decoded.astype(bool), mask)
    rows, cols = np.nonzero(mask)
    assert encoded["area"] == mask.sum()
    assert encoded["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1, rows.max() - rows.min() + 1]


def test_empty_mask_encodes_to_zero_area():
    encoded = encode_mask(np.zeros((5, 6), bool))
    assert encoded["area"] == 0 and not coco_mask.decode({"size": [5, 6], "counts": encoded["counts"]}).any()


@pytest.fixture(scope="module")
def tiny_outputs(tiny_checkpoint_seed1):
    from m2f_model import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor.from_pretrained(str(tiny_checkpoint_seed1))
    model = Mask2FormerForUniversalSegmentation.from_pretrained(str(tiny_checkpoint_seed1)).eval()
    image = Image.fromarray(random_rgb(50, 70, seed=0))
    with torch.inference_mode():
        outputs = model(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
    return processor, outputs.class_queries_logits[0].numpy(), outputs.masks_queries_logits[0].numpy()


def test_every_task_yields_masks_at_the_original_size(tiny_outputs):
    processor, class_logits, mask_logits = tiny_outputs
    segments = list(predict_segments(processor, class_logits, mask_logits, height=50, width=70,
                                     settings=PostprocessSettings(**LOW)))
    tasks = {s.task for s in segments}
    assert tasks == {"panoptic", "instance", "semantic"}
    assert all(s.mask.shape == (50, 70) and s.mask.dtype == bool and s.mask.any() for s in segments)
    panoptic = [s.mask for s in segments if s.task == "panoptic"]
    assert (np.sum(panoptic, axis=0) <= 1).all(), "panoptic segments overlap"
    semantic = [s.mask for s in segments if s.task == "semantic"]
    assert (np.sum(semantic, axis=0) == 1).all(), "semantic segments must partition the image"
    assert all(s.score is None for s in segments if s.task == "semantic")


def test_tasks_option_limits_what_is_produced(tiny_outputs):
    processor, class_logits, mask_logits = tiny_outputs
    segments = list(predict_segments(processor, class_logits, mask_logits, height=50, width=70,
                                     settings=PostprocessSettings(tasks=("semantic",), **LOW)))
    assert {s.task for s in segments} == {"semantic"}


def test_fused_labels_give_one_panoptic_row_per_segment(tiny_outputs):
    processor, class_logits, mask_logits = tiny_outputs
    all_labels = tuple(range(class_logits.shape[-1] - 1))
    segments = [s for s in predict_segments(processor, class_logits, mask_logits, height=50, width=70,
                                            settings=PostprocessSettings(tasks=("panoptic",), **LOW,
                                                                         label_ids_to_fuse=all_labels))]
    unfused = [s for s in predict_segments(processor, class_logits, mask_logits, height=50, width=70,
                                           settings=PostprocessSettings(tasks=("panoptic",), **LOW))]
    assert len({s.label_id for s in unfused}) < len(unfused), "the fixture needs two segments of one label"
    assert segments and all(s.was_fused for s in segments)
    labels = [s.label_id for s in segments]
    assert len(labels) == len(set(labels)), "a fused label must appear once"
    for label in labels:
        fused_mask = next(s.mask for s in segments if s.label_id == label)
        union = np.any([s.mask for s in unfused if s.label_id == label], axis=0)
        assert np.array_equal(fused_mask, union)


def test_a_reused_fused_id_never_gives_two_labels_one_panoptic_segment(tiny_outputs):
    # Queries in order: label 0 (fused), label 1, label 0 again (reuses the fused id), label 2. transformers'
    # numbering gives the last one the id of the label-1 segment; each query owns one quadrant here.
    processor = tiny_outputs[0]
    class_logits = np.full((4, 4), -10.0, np.float32)  # (queries, 3 labels + no-object)
    for query, label in enumerate((0, 1, 0, 2)):
        class_logits[query, label] = 10.0
    mask_logits = np.full((4, 8, 8), -10.0, np.float32)
    for query, (rows, cols) in enumerate(((slice(0, 4), slice(0, 4)), (slice(0, 4), slice(4, 8)),
                                         (slice(4, 8), slice(0, 4)), (slice(4, 8), slice(4, 8)))):
        mask_logits[query, rows, cols] = 10.0
    segments = list(predict_segments(processor, class_logits, mask_logits, height=32, width=32,
                                     settings=PostprocessSettings(tasks=("panoptic",), label_ids_to_fuse=(0,))))
    assert sorted(s.label_id for s in segments) == [0, 1, 2]
    assert len({s.segment_id for s in segments}) == 3
    assert np.sum([s.mask for s in segments], axis=0).min() == 1  # every pixel in exactly one segment
    assert next(s for s in segments if s.label_id == 0).mask.sum() == 2 * 16 * 16


def test_segment_records_carry_labels_provenance_and_decodable_rle(tiny_outputs):
    processor, class_logits, mask_logits = tiny_outputs
    segments = list(predict_segments(processor, class_logits, mask_logits, height=50, width=70,
                                     settings=PostprocessSettings(**LOW)))
    records = segment_records(iter(segments), image_uri="/x.png", image_id="x.png", height=50, width=70,
                              id2label={0: "circle", 1: "square", 2: "triangle", 3: "sky", 4: "ground"},
                              model="m", run_id="r")
    for segment, record in zip(segments, records):
        decoded = coco_mask.decode({"size": record.rle_size, "counts": record.rle_counts}).astype(bool)
        assert np.array_equal(decoded, segment.mask)
        assert record.label == ["circle", "square", "triangle", "sky", "ground"][record.label_id]
        assert record.area == segment.mask.sum() and (record.model, record.run_id) == ("m", "r")


def test_unknown_task_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match="panoptic,instance,semantic"):
        PostprocessSettings(tasks=("panoptic", "depth"))
