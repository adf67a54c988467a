"""PQ, mask AP and mIoU on hand-built cases whose answers are worked out by hand in the comments."""
from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from training.metrics import (PanopticSegment, mask_average_precision, mean_iou, panoptic_image_stats,
                              panoptic_quality)

CATEGORIES = [
    {"id": 1, "name": "circle", "isthing": 1},
    {"id": 2, "name": "square", "isthing": 1},
    {"id": 4, "name": "sky", "isthing": 0},
]


def _scene() -> tuple[np.ndarray, list[PanopticSegment]]:
    """20x20 image: sky everywhere (id 1) except a 10x10 circle-class thing (id 7) at rows/cols 0-9."""
    gt = np.ones((20, 20), dtype=np.int32)
    gt[0:10, 0:10] = 7
    return gt, [PanopticSegment(1, 4), PanopticSegment(7, 1)]


def test_perfect_panoptic_prediction_scores_100():
    gt_map, gt_segments = _scene()
    result = panoptic_quality([(gt_map, gt_segments)], [(gt_map.copy(), list(gt_segments))], CATEGORIES)
    for group in ("all", "things", "stuff"):
        assert result[group]["pq"] == pytest.approx(100.0)
        assert result[group]["sq"] == pytest.approx(100.0)
        assert result[group]["rq"] == pytest.approx(100.0)


def test_partial_overlap_gives_hand_computed_pq():
    gt_map, gt_segments = _scene()
    # Prediction ids differ from ground truth on purpose: matching is by overlap, not id.
    pred = np.full((20, 20), 3, dtype=np.int32)  # sky
    pred[0:8, 0:10] = 5  # thing covers 80 of the 100 ground-truth pixels
    result = panoptic_quality([(gt_map, gt_segments)], [(pred, [PanopticSegment(3, 4), PanopticSegment(5, 1)])],
                              CATEGORIES)
    # thing IoU = 80 / 100 = 0.8; sky IoU = 300 / 320 = 0.9375 (sky prediction also holds 20 thing pixels)
    assert result["things"]["pq"] == pytest.approx(80.0)
    assert result["stuff"]["pq"] == pytest.approx(93.75)
    assert result["all"]["pq"] == pytest.approx((80.0 + 93.75) / 2)
    assert result["per_class"]["circle"]["sq"] == pytest.approx(80.0)
    assert result["per_class"]["circle"]["rq"] == pytest.approx(100.0)


def test_iou_of_exactly_half_is_a_miss_and_a_false_positive():
    gt_map, gt_segments = _scene()
    pred = np.full((20, 20), 3, dtype=np.int32)
    pred[0:5, 0:10] = 5  # 50 of 100 pixels: IoU 0.5 is not > 0.5
    stats = panoptic_image_stats(gt_map, gt_segments, pred, [PanopticSegment(3, 4), PanopticSegment(5, 1)])
    assert (stats[1].tp, stats[1].fp, stats[1].fn) == (0, 1, 1)


def test_matched_missed_and_spurious_segments_count_in_pq_sq_rq():
    # Two circle-class things; one found with IoU 0.8, one missed, plus a spurious circle on the sky.
    gt = np.ones((20, 20), dtype=np.int32)
    gt[0:10, 0:10] = 7
    gt[12:16, 12:16] = 8
    pred = np.full((20, 20), 3, dtype=np.int32)
    pred[0:8, 0:10] = 5
    pred[16:20, 0:4] = 6
    gt_segments = [PanopticSegment(1, 4), PanopticSegment(7, 1), PanopticSegment(8, 1)]
    pred_segments = [PanopticSegment(3, 4), PanopticSegment(5, 1), PanopticSegment(6, 1)]
    result = panoptic_quality([(gt, gt_segments)], [(pred, pred_segments)], CATEGORIES)
    circle = result["per_class"]["circle"]
    # tp=1, fp=1, fn=1: PQ = 0.8 / (1 + 0.5 + 0.5) = 0.4, SQ = 0.8, RQ = 0.5
    assert (circle["tp"], circle["fp"], circle["fn"]) == (1, 1, 1)
    assert circle["pq"] == pytest.approx(40.0)
    assert circle["sq"] == pytest.approx(80.0)
    assert circle["rq"] == pytest.approx(50.0)


def test_wrong_category_is_a_false_positive_and_a_miss():
    gt_map, gt_segments = _scene()
    result = panoptic_quality([(gt_map, gt_segments)], [(gt_map.copy(), [PanopticSegment(1, 4), PanopticSegment(7, 2)])],
                              CATEGORIES)
    assert result["per_class"]["circle"]["fn"] == 1
    assert result["per_class"]["square"]["fp"] == 1
    assert result["things"]["pq"] == 0.0
    assert result["stuff"]["pq"] == pytest.approx(100.0)


def test_prediction_on_unlabeled_pixels_is_not_a_false_positive():
    gt_map, gt_segments = _scene()
    gt_map[15:20, 15:20] = 0  # void
    pred = gt_map.copy()
    pred[15:20, 15:20] = 9  # a square predicted wholly on void
    pred_segments = list(gt_segments) + [PanopticSegment(9, 2)]
    stats = panoptic_image_stats(gt_map, gt_segments, pred, pred_segments)
    assert 2 not in stats or stats[2].fp == 0
    # Sky union excludes nothing here, and its pixels on void were never predicted as sky: IoU 1.
    assert stats[4].tp == 1 and stats[4].iou_sum == pytest.approx(1.0)


def test_panoptic_maps_of_different_sizes_are_rejected():
    gt_map, gt_segments = _scene()
    with pytest.raises(ValueError, match="differ in size"):
        panoptic_image_stats(gt_map, gt_segments, gt_map[:10], gt_segments)


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _instances(masks: list[np.ndarray]) -> dict:
    annotations = []
    for index, mask in enumerate(masks):
        ys, xs = np.nonzero(mask)
        annotations.append({"id": index + 1, "image_id": 1, "category_id": 1, "iscrowd": 0,
                            "area": int(mask.sum()), "segmentation": _rle(mask),
                            "bbox": [float(xs.min()), float(ys.min()), float(np.ptp(xs) + 1), float(np.ptp(ys) + 1)]})
    return {"images": [{"id": 1, "file_name": "a.png", "height": 40, "width": 40}], "annotations": annotations,
            "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}]}


def _box(y0: int, x0: int, size: int) -> np.ndarray:
    mask = np.zeros((40, 40), dtype=bool)
    mask[y0:y0 + size, x0:x0 + size] = True
    return mask


def test_perfect_detections_give_mask_ap_100():
    masks = [_box(0, 0, 12), _box(20, 20, 15)]
    detections = [{"image_id": 1, "category_id": 1, "segmentation": _rle(m), "score": 0.9} for m in masks]
    result = mask_average_precision(_instances(masks), detections)
    assert result["ap"] == pytest.approx(100.0)
    assert result["ap50"] == pytest.approx(100.0)
    assert result["per_class"]["circle"] == pytest.approx(100.0)


def test_half_recall_and_a_higher_scored_false_detection_give_hand_computed_ap():
    masks = [_box(0, 0, 12), _box(20, 20, 15)]
    detections = [
        {"image_id": 1, "category_id": 1, "segmentation": _rle(masks[0]), "score": 0.9},
        {"image_id": 1, "category_id": 1, "segmentation": _rle(_box(0, 25, 10)), "score": 0.95},  # hits nothing
    ]
    result = mask_average_precision(_instances(masks), detections)
    # Ranked: FP then TP -> precision 0.5 at recall 0.5, recall never above 0.5. COCO's 101-point
    # interpolation: recall points 0.00..0.50 (51 of them) have precision 0.5, the other 50 have 0.
    assert result["ap"] == pytest.approx(100 * 51 * 0.5 / 101, abs=1e-6)


def test_no_detections_give_zero_ap():
    assert mask_average_precision(_instances([_box(0, 0, 12)]), [])["ap"] == 0.0


def test_mean_iou_matches_hand_computed_value():
    gt = np.zeros((10, 10), dtype=np.int64) + 4
    gt[:, :5] = 1  # 50 circle pixels, 50 sky pixels
    gt[0, 0] = 255  # ignored
    pred = np.zeros((10, 10), dtype=np.int64) + 4
    pred[:, :4] = 1  # circle predicted on 40 pixels (39 counted, pixel (0,0) is ignored)
    result = mean_iou([gt], [pred], CATEGORIES)
    # circle: intersection 39, union 49 -> 39/49; sky: intersection 50, union 60 -> 50/60
    assert result["per_class"]["circle"] == pytest.approx(100 * 39 / 49)
    assert result["per_class"]["sky"] == pytest.approx(100 * 50 / 60)
    assert result["miou"] == pytest.approx(100 * (39 / 49 + 50 / 60) / 2)
    assert "square" not in result["per_class"]


def test_perfect_semantic_prediction_gives_miou_100():
    gt = np.zeros((8, 8), dtype=np.int64) + 4
    gt[2:5, 2:5] = 2
    assert mean_iou([gt], [gt.copy()], CATEGORIES)["miou"] == pytest.approx(100.0)
