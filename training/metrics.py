"""Segmentation metrics as pure functions: panoptic quality, COCO mask AP, mean IoU.

Conventions follow the reference tools so numbers are comparable with published ones:
- PQ follows panopticapi (Kirillov et al.): a predicted and a ground-truth segment of the same category match
  when IoU > 0.5; IoU's union leaves out the prediction's overlap with unlabeled (void) pixels; unmatched
  predictions that lie mostly (> 50 %) on void or on a crowd region of their category are not false positives.
  PQ/SQ/RQ are averaged over categories that occur (TP + FP + FN > 0), for all, things and stuff.
- Mask AP is pycocotools' COCOeval with iouType "segm".
- mIoU averages per-category IoU over categories whose union is non-empty; `ignore_index` pixels don't count.
All scores are reported in percent (0-100).
"""
from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["PanopticSegment", "PanopticCategoryStats", "panoptic_image_stats", "accumulate_panoptic_stats",
           "summarize_panoptic", "panoptic_quality", "mask_average_precision", "SemanticConfusion",
           "semantic_image_confusion", "summarize_semantic", "mean_iou"]

VOID_ID = 0


@dataclass(frozen=True)
class PanopticSegment:
    """One segment of a panoptic map: its id in the map, its COCO category, and whether it is a crowd region."""

    id: int
    category_id: int
    iscrowd: bool = False


@dataclass
class PanopticCategoryStats:
    """Running counts of one category: true positives, false positives, false negatives, summed matched IoU."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    iou_sum: float = 0.0

    def add(self, other: "PanopticCategoryStats") -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum


def panoptic_image_stats(gt_map: np.ndarray, gt_segments: Sequence[PanopticSegment], pred_map: np.ndarray,
                         pred_segments: Sequence[PanopticSegment]) -> dict[int, PanopticCategoryStats]:
    """Matches one image's predicted segments to its ground truth; returns per-category counts.

    gt_map, pred_map: (H, W) integer segment ids; 0 (and any id not in the segment list) means unlabeled.
    """
    if gt_map.shape != pred_map.shape:
        raise ValueError(f"panoptic maps differ in size: ground truth {gt_map.shape} vs prediction {pred_map.shape}; "
                         "predict at the ground-truth image size")
    gt_by_id = {s.id: s for s in gt_segments if s.id != VOID_ID}
    pred_by_id = {s.id: s for s in pred_segments if s.id != VOID_ID}
    # Ids outside the segment lists count as void on either side.
    gt_ids = np.where(np.isin(gt_map, list(gt_by_id)), gt_map, VOID_ID).astype(np.int64).ravel()
    pred_ids = np.where(np.isin(pred_map, list(pred_by_id)), pred_map, VOID_ID).astype(np.int64).ravel()

    gt_area = dict(zip(*np.unique(gt_ids, return_counts=True)))
    pred_area = dict(zip(*np.unique(pred_ids, return_counts=True)))
    offset = int(max(pred_ids.max(initial=0), max(pred_by_id, default=0))) + 1
    pairs, pair_counts = np.unique(gt_ids * offset + pred_ids, return_counts=True)
    intersection = {(int(p // offset), int(p % offset)): int(c) for p, c in zip(pairs, pair_counts)}

    stats: dict[int, PanopticCategoryStats] = {}

    def category(category_id: int) -> PanopticCategoryStats:
        return stats.setdefault(category_id, PanopticCategoryStats())

    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_id, pred_id), overlap in intersection.items():
        if gt_id not in gt_by_id or pred_id not in pred_by_id:
            continue
        gt, pred = gt_by_id[gt_id], pred_by_id[pred_id]
        if gt.iscrowd or gt.category_id != pred.category_id:
            continue
        union = pred_area[pred_id] + gt_area[gt_id] - overlap - intersection.get((VOID_ID, pred_id), 0)
        iou = overlap / union
        if iou > 0.5:
            category(gt.category_id).tp += 1
            category(gt.category_id).iou_sum += iou
            gt_matched.add(gt_id)
            pred_matched.add(pred_id)

    crowd_by_category: dict[int, int] = {}
    for gt_id, gt in gt_by_id.items():
        if gt_id not in gt_area:
            continue  # listed but absent from the map: nothing to find
        if gt.iscrowd:
            crowd_by_category[gt.category_id] = gt_id
        elif gt_id not in gt_matched:
            category(gt.category_id).fn += 1

    for pred_id, pred in pred_by_id.items():
        if pred_id in pred_matched or pred_id not in pred_area:
            continue
        ignored = intersection.get((VOID_ID, pred_id), 0)
        if pred.category_id in crowd_by_category:
            ignored += intersection.get((crowd_by_category[pred.category_id], pred_id), 0)
        if ignored / pred_area[pred_id] > 0.5:
            continue
        category(pred.category_id).fp += 1
    return stats


def accumulate_panoptic_stats(per_image: Iterable[Mapping[int, PanopticCategoryStats]]) -> dict[int, PanopticCategoryStats]:
    """Sums per-image counts into dataset-level counts per category."""
    total: dict[int, PanopticCategoryStats] = {}
    for image_stats in per_image:
        for category_id, counts in image_stats.items():
            total.setdefault(category_id, PanopticCategoryStats()).add(counts)
    return total


def summarize_panoptic(stats: Mapping[int, PanopticCategoryStats], categories: Sequence[Mapping]) -> dict:
    """PQ, SQ, RQ (percent) for all / things / stuff and per category.

    categories: COCO category records with "id", "name" and "isthing".
    """
    per_class: dict[str, dict] = {}
    groups: dict[str, list[tuple[float, float, float]]] = {"all": [], "things": [], "stuff": []}
    for record in categories:
        counts = stats.get(record["id"], PanopticCategoryStats())
        denominator = counts.tp + 0.5 * counts.fp + 0.5 * counts.fn
        if denominator == 0:
            continue
        pq = counts.iou_sum / denominator
        sq = counts.iou_sum / counts.tp if counts.tp else 0.0
        rq = counts.tp / denominator
        per_class[record["name"]] = {"pq": 100 * pq, "sq": 100 * sq, "rq": 100 * rq, "tp": counts.tp,
                                     "fp": counts.fp, "fn": counts.fn, "isthing": bool(record.get("isthing", 1))}
        groups["all"].append((pq, sq, rq))
        groups["things" if record.get("isthing", 1) else "stuff"].append((pq, sq, rq))
    summary: dict = {}
    for group, values in groups.items():
        if values:
            pq, sq, rq = (100 * float(np.mean(column)) for column in zip(*values))
        else:
            pq = sq = rq = 0.0
        summary[group] = {"pq": pq, "sq": sq, "rq": rq, "n": len(values)}
    summary["per_class"] = per_class
    return summary


def panoptic_quality(ground_truth: Sequence[tuple[np.ndarray, Sequence[PanopticSegment]]],
                     predictions: Sequence[tuple[np.ndarray, Sequence[PanopticSegment]]],
                     categories: Sequence[Mapping]) -> dict:
    """PQ over image pairs: ground_truth[i] and predictions[i] are (segment-id map, segments) of the same image."""
    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} ground-truth images but {len(predictions)} predictions; pair them up")
    per_image = [panoptic_image_stats(gt_map, gt_segments, pred_map, pred_segments)
                 for (gt_map, gt_segments), (pred_map, pred_segments) in zip(ground_truth, predictions)]
    return summarize_panoptic(accumulate_panoptic_stats(per_image), categories)


def mask_average_precision(ground_truth: Mapping, detections: Sequence[Mapping],
                           image_ids: Sequence[int] | None = None) -> dict:
    """COCO mask AP (percent) of `detections` against a COCO instances dict.

    detections: {"image_id", "category_id", "segmentation": COCO RLE (counts str or bytes), "score"}.
    image_ids: evaluate only these images (default: every image in the ground truth).
    Returns AP, AP50, AP75, APs, APm, APl (-1 where an area range has no ground truth) and per-class AP.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO()
    gt.dataset = copy.deepcopy(dict(ground_truth))
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    names = {c["id"]: c["name"] for c in gt.dataset.get("categories", [])}
    keys = ["ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large"]
    known = [d for d in detections if d["category_id"] in names]
    if image_ids is not None:
        wanted = set(int(i) for i in image_ids)
        known = [d for d in known if int(d["image_id"]) in wanted]
    if not known:
        return {**{k: 0.0 for k in keys}, "per_class": {name: 0.0 for name in names.values()}}
    results = []
    for detection in known:
        segmentation = dict(detection["segmentation"])
        if isinstance(segmentation["counts"], str):
            segmentation["counts"] = segmentation["counts"].encode("ascii")
        results.append({"image_id": int(detection["image_id"]), "category_id": int(detection["category_id"]),
                        "segmentation": segmentation, "score": float(detection["score"])})
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        evaluator = COCOeval(gt, dt, iouType="segm")
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    summary = {key: (100 * float(value) if value >= 0 else -1.0) for key, value in zip(keys, evaluator.stats[:6])}
    # precision: (iou thresholds, recall points, categories, area ranges, max-dets); area "all", 100 dets.
    precision = evaluator.eval["precision"][:, :, :, 0, -1]
    per_class = {}
    for k, category_id in enumerate(evaluator.params.catIds):
        values = precision[:, :, k]
        values = values[values > -1]
        per_class[names[category_id]] = 100 * float(values.mean()) if values.size else -1.0
    summary["per_class"] = per_class
    return summary


@dataclass
class SemanticConfusion:
    """Per-category pixel counts accumulated over images: intersection, union, ground-truth area."""

    intersection: dict[int, int] = field(default_factory=dict)
    union: dict[int, int] = field(default_factory=dict)
    gt_area: dict[int, int] = field(default_factory=dict)

    def add(self, other: "SemanticConfusion") -> None:
        for mine, theirs in ((self.intersection, other.intersection), (self.union, other.union),
                             (self.gt_area, other.gt_area)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value


def semantic_image_confusion(gt_semantic: np.ndarray, pred_semantic: np.ndarray, *,
                             ignore_index: int = 255) -> SemanticConfusion:
    """Per-category intersection/union of one image's (H, W) category maps; gt pixels == ignore_index skip."""
    if gt_semantic.shape != pred_semantic.shape:
        raise ValueError(f"semantic maps differ in size: ground truth {gt_semantic.shape} vs prediction "
                         f"{pred_semantic.shape}; predict at the ground-truth image size")
    valid = gt_semantic != ignore_index
    gt, pred = gt_semantic[valid].astype(np.int64), pred_semantic[valid].astype(np.int64)
    confusion = SemanticConfusion()
    for category_id in np.union1d(np.unique(gt), np.unique(pred)):
        if category_id == ignore_index:
            continue
        in_gt, in_pred = gt == category_id, pred == category_id
        key = int(category_id)
        confusion.intersection[key] = int((in_gt & in_pred).sum())
        confusion.union[key] = int((in_gt | in_pred).sum())
        confusion.gt_area[key] = int(in_gt.sum())
    return confusion


def summarize_semantic(confusion: SemanticConfusion, categories: Sequence[Mapping]) -> dict:
    """mIoU (percent) over categories with a non-empty union, per-class IoU, and pixel accuracy."""
    per_class = {}
    for record in categories:
        union = confusion.union.get(record["id"], 0)
        if union:
            per_class[record["name"]] = 100 * confusion.intersection.get(record["id"], 0) / union
    known = {record["id"] for record in categories}
    correct = sum(v for k, v in confusion.intersection.items() if k in known)
    total = sum(v for k, v in confusion.gt_area.items() if k in known)
    return {"miou": float(np.mean(list(per_class.values()))) if per_class else 0.0,
            "pixel_accuracy": 100 * correct / total if total else 0.0, "per_class": per_class}


def mean_iou(gt_semantic: Sequence[np.ndarray], pred_semantic: Sequence[np.ndarray], categories: Sequence[Mapping],
             *, ignore_index: int = 255) -> dict:
    """mIoU over pairs of (H, W) category-id maps of the same images."""
    if len(gt_semantic) != len(pred_semantic):
        raise ValueError(f"{len(gt_semantic)} ground-truth maps but {len(pred_semantic)} predictions; pair them up")
    total = SemanticConfusion()
    for gt, pred in zip(gt_semantic, pred_semantic):
        total.add(semantic_image_confusion(gt, pred, ignore_index=ignore_index))
    return summarize_semantic(total, categories)
