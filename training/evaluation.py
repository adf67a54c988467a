"""Scores segment predictions against a COCO-format split: PQ (panoptic), mask AP (instance), mIoU (semantic).

Predictions come from either source in one common form, a list of `PredictedSegment` per image file name:
- a model directory, run here (`predict_segments`: processor -> forward -> post_process_* -> COCO RLE), or
- the Parquet tables a labeling run wrote (`read_segment_tables`: `segments/*.parquet` rows).
Both then go through the same `score_predictions`, so the same segments give the same numbers. Images are
matched by file name (the last part of `image_uri` against the COCO `file_name`); labels by class name.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools import mask as mask_utils

from training.metrics import (PanopticSegment, SemanticConfusion, accumulate_panoptic_stats, mask_average_precision,
                              panoptic_image_stats, semantic_image_confusion, summarize_panoptic, summarize_semantic)
from training.storage import DatasetLocation, open_location

__all__ = ["TASKS", "PredictedSegment", "GroundTruthSplit", "load_ground_truth", "predict_segments",
           "read_segment_tables", "score_predictions", "format_report", "write_report", "encode_mask",
           "stuff_label_ids"]

TASKS = ("panoptic", "instance", "semantic")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class PredictedSegment:
    """One predicted segment as the labeling pipeline stores it: task, class name, score and COCO RLE."""

    task: str
    label: str
    score: float
    rle: Mapping[str, Any]  # {"size": [height, width], "counts": str}

    def mask(self) -> np.ndarray:
        counts = self.rle["counts"]
        decoded = mask_utils.decode({"size": [int(v) for v in self.rle["size"]],
                                     "counts": counts.encode("ascii") if isinstance(counts, str) else counts})
        return decoded.astype(bool)  # (H, W)


def encode_mask(mask: np.ndarray) -> dict:
    """(H, W) bool -> COCO RLE with a str `counts` (what the segments table stores)."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


@dataclass
class GroundTruthSplit:
    """One split of a COCO-layout dataset root: panoptic and/or instance annotations and the image list."""

    location: DatasetLocation
    split: str
    images: list[dict]  # COCO image records: id, file_name, height, width
    categories: list[dict]  # COCO category records with isthing (panoptic's if present, else instances')
    panoptic_by_image_id: dict[int, dict] = field(default_factory=dict)
    instances: dict | None = None

    @property
    def has_panoptic(self) -> bool:
        return bool(self.panoptic_by_image_id)

    def image_path(self, image: Mapping) -> str:
        return self.location.path(self.split, image["file_name"])

    def panoptic(self, image: Mapping) -> tuple[np.ndarray, list[PanopticSegment]]:
        """(H, W) segment-id map and its segments for one image."""
        annotation = self.panoptic_by_image_id[image["id"]]
        png_name = annotation.get("file_name") or posixpath.splitext(image["file_name"])[0] + ".png"
        rgb = self.location.read_image(self.location.path("annotations", f"panoptic_{self.split}", png_name),
                                       mode="RGB").astype(np.int64)
        ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]  # (H, W)
        segments = [PanopticSegment(int(s["id"]), int(s["category_id"]), bool(s.get("iscrowd", 0)))
                    for s in annotation["segments_info"]]
        return ids, segments

    def semantic(self, panoptic_ids: np.ndarray, segments: Sequence[PanopticSegment]) -> np.ndarray:
        """(H, W) category-id map from a panoptic map; unlabeled and crowd pixels are IGNORE_INDEX."""
        semantic = np.full(panoptic_ids.shape, IGNORE_INDEX, dtype=np.int64)
        for segment in segments:
            if not segment.iscrowd:
                semantic[panoptic_ids == segment.id] = segment.category_id
        return semantic


def load_ground_truth(root: str, split: str, *, storage_options: dict | None = None,
                      limit: int | None = None) -> GroundTruthSplit:
    """Reads annotations/{panoptic,instances}_{split}.json under `root` (local or s3://); at least one must exist."""
    location = open_location(root, storage_options)
    panoptic_path = location.path("annotations", f"panoptic_{split}.json")
    instances_path = location.path("annotations", f"instances_{split}.json")
    panoptic = location.read_json(panoptic_path) if location.exists(panoptic_path) else None
    instances = location.read_json(instances_path) if location.exists(instances_path) else None
    if panoptic is None and instances is None:
        raise FileNotFoundError(f"neither {location.describe(panoptic_path)} nor {location.describe(instances_path)} "
                                f"exists; evaluation needs COCO panoptic (PQ, mIoU) or instance (AP) annotations")
    source = panoptic if panoptic is not None else instances
    images = sorted(source["images"], key=lambda image: image["id"])
    if limit is not None:
        images = images[:limit]
    categories = [dict(c, isthing=int(c.get("isthing", 1))) for c in source["categories"]]
    panoptic_by_image_id = {a["image_id"]: a for a in panoptic["annotations"]} if panoptic is not None else {}
    return GroundTruthSplit(location=location, split=split, images=images, categories=categories,
                            panoptic_by_image_id=panoptic_by_image_id, instances=instances)


def stuff_label_ids(id2label: Mapping[int, str], ground_truth: GroundTruthSplit) -> list[int]:
    """The model labels whose names are stuff categories (isthing = 0) of the split."""
    stuff_names = {c["name"] for c in ground_truth.categories if not c["isthing"]}
    return sorted(int(label) for label, name in id2label.items() if name in stuff_names)


def image_key(uri_or_file_name: str) -> str:
    """The name images are matched by: the last path component of a URI or COCO file_name."""
    return posixpath.basename(str(uri_or_file_name).split("?")[0].rstrip("/"))


def predict_segments(model: Any, processor: Any, ground_truth: GroundTruthSplit, *,
                     tasks: Sequence[str] = TASKS, threshold: float = 0.5, instance_threshold: float | None = None,
                     mask_threshold: float = 0.5, overlap_mask_area_threshold: float = 0.8,
                     label_ids_to_fuse: Iterable[int] | None = None, batch_size: int = 8,
                     device: str = "cpu") -> dict[str, list[PredictedSegment]]:
    """Runs `model` on every image of the split and post-processes it into segments at the image's own size.

    Images are batched only with images of the same preprocessed size, so padding never changes a result.
    The knobs and their defaults are those of jobs/segment_bucket.py (transformers' names): label_ids_to_fuse
    are panoptic labels merged into one segment per image (none by default, as in the labeling job; see
    `stuff_label_ids` for the split's stuff classes).
    """
    import torch

    id2label = {int(k): v for k, v in model.config.id2label.items()}
    label_ids_to_fuse = set(label_ids_to_fuse or ())
    instance_threshold = threshold if instance_threshold is None else instance_threshold

    model.eval().to(device)
    predictions: dict[str, list[PredictedSegment]] = {}
    pending: list[tuple[str, tuple[int, int], Any]] = []  # (key, original size, pixel_values (3, h, w))

    def flush() -> None:
        if not pending:
            return
        pixel_values = torch.stack([item[2] for item in pending]).to(device)
        sizes = [item[1] for item in pending]
        with torch.inference_mode():
            outputs = model(pixel_values=pixel_values)
        outputs.class_queries_logits = outputs.class_queries_logits.float().cpu()
        outputs.masks_queries_logits = outputs.masks_queries_logits.float().cpu()
        per_task = {}
        if "panoptic" in tasks:
            per_task["panoptic"] = processor.post_process_panoptic_segmentation(
                outputs, threshold=threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold, label_ids_to_fuse=label_ids_to_fuse,
                target_sizes=sizes)
        if "instance" in tasks:
            per_task["instance"] = processor.post_process_instance_segmentation(
                outputs, threshold=instance_threshold, mask_threshold=mask_threshold,
                overlap_mask_area_threshold=overlap_mask_area_threshold, target_sizes=sizes,
                return_binary_maps=True)
        if "semantic" in tasks:
            per_task["semantic"] = processor.post_process_semantic_segmentation(outputs, target_sizes=sizes)
        for index, (key, _size, _pixels) in enumerate(pending):
            segments: list[PredictedSegment] = []
            for task, results in per_task.items():
                segments.extend(_segments_from_post_processing(task, results[index], id2label))
            predictions[key] = segments
        pending.clear()

    for image in ground_truth.images:
        rgb = ground_truth.location.read_image(ground_truth.image_path(image), mode="RGB")  # (H, W, 3)
        pixel_values = processor(images=[rgb], return_tensors="pt")["pixel_values"][0]  # (3, h, w)
        if pending and (len(pending) >= batch_size or pending[0][2].shape != pixel_values.shape):
            flush()
        pending.append((image_key(image["file_name"]), (int(rgb.shape[0]), int(rgb.shape[1])), pixel_values))
    flush()
    return predictions


def _segments_from_post_processing(task: str, result: Any, id2label: Mapping[int, str]) -> list[PredictedSegment]:
    """One image's post-processor output -> segments with RLE masks (one per panoptic id / instance / class)."""
    if task == "semantic":
        label_map = np.asarray(result)  # (H, W) label ids
        return [PredictedSegment("semantic", id2label[int(label_id)], 1.0, encode_mask(label_map == label_id))
                for label_id in np.unique(label_map)]
    segmentation = np.asarray(result["segmentation"])
    infos = result["segments_info"]
    segments = []
    if task == "instance":
        # return_binary_maps=True: (N, H, W) binary maps, one per entry of segments_info.
        for index, info in enumerate(infos):
            mask = segmentation[index] > 0
            if mask.any():
                segments.append(PredictedSegment("instance", id2label[int(info["label_id"])], float(info["score"]),
                                                 encode_mask(mask)))
        return segments
    # Panoptic: fused stuff repeats its id in segments_info; one segment per id, scored by its best query.
    by_id: dict[int, dict] = {}
    for info in infos:
        known = by_id.get(int(info["id"]))
        if known is None or info["score"] > known["score"]:
            by_id[int(info["id"])] = info
    for segment_id, info in by_id.items():
        mask = segmentation == segment_id
        if mask.any():
            segments.append(PredictedSegment("panoptic", id2label[int(info["label_id"])], float(info["score"]),
                                             encode_mask(mask)))
    return segments


def read_segment_tables(output_uri: str, *, storage_options: dict | None = None) -> dict[str, list[PredictedSegment]]:
    """Reads `segments/*.parquet` of a labeling run (local or s3://) into segments keyed by image file name."""
    import fsspec
    import pyarrow.parquet as pq

    filesystem, root = fsspec.core.url_to_fs(str(output_uri), **(storage_options or {}))
    folder = root.rstrip("/") + "/segments"
    files = sorted(path for path in (filesystem.find(folder) if filesystem.isdir(folder) else [])
                   if path.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no segments/*.parquet under {output_uri}; pass the --output folder of "
                                f"jobs/segment_bucket.py")
    columns = ["image_uri", "task", "label", "score", "rle_size", "rle_counts"]
    predictions: dict[str, list[PredictedSegment]] = {}
    for path in files:
        table = pq.read_table(path, filesystem=filesystem, columns=columns)
        for row in table.to_pylist():
            score = row["score"]
            predictions.setdefault(image_key(row["image_uri"]), []).append(PredictedSegment(
                task=row["task"], label=row["label"], score=float(score) if score is not None else 1.0,
                rle={"size": list(row["rle_size"]), "counts": row["rle_counts"]}))
    return predictions


def score_predictions(ground_truth: GroundTruthSplit, predictions: Mapping[str, Sequence[PredictedSegment]], *,
                      tasks: Sequence[str] = TASKS) -> dict:
    """PQ / mask AP / mIoU of `predictions` (keyed by image file name) on every image of `ground_truth`."""
    category_by_name = {c["name"]: c for c in ground_truth.categories}
    if ground_truth.instances is not None:
        for record in ground_truth.instances["categories"]:
            category_by_name.setdefault(record["name"], dict(record, isthing=1))
    keys = [image_key(image["file_name"]) for image in ground_truth.images]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{ground_truth.split} has several images with the same file name; predictions are "
                         f"matched by file name, so they must be unique")

    unknown_labels: dict[str, int] = {}
    panoptic_stats, semantic_total, detections = [], SemanticConfusion(), []
    missing = 0
    run_panoptic = "panoptic" in tasks and ground_truth.has_panoptic
    run_semantic = "semantic" in tasks and ground_truth.has_panoptic
    run_instance = "instance" in tasks and ground_truth.instances is not None
    for image, key in zip(ground_truth.images, keys):
        segments = predictions.get(key)
        if segments is None:
            missing += 1
            segments = []
        size = (int(image["height"]), int(image["width"]))
        by_task: dict[str, list[tuple[PredictedSegment, int]]] = {task: [] for task in TASKS}
        for segment in segments:
            category = category_by_name.get(segment.label)
            if category is None:
                unknown_labels[segment.label] = unknown_labels.get(segment.label, 0) + 1
                continue
            if tuple(int(v) for v in segment.rle["size"]) != size:
                raise ValueError(f"a {segment.task} segment of {key} has size {list(segment.rle['size'])} but the "
                                 f"image is {list(size)}; predictions must be at the original image size")
            by_task.setdefault(segment.task, []).append((segment, int(category["id"])))

        if run_panoptic or run_semantic:
            gt_ids, gt_segments = ground_truth.panoptic(image)
        if run_panoptic:
            pred_ids = np.zeros(size, dtype=np.int64)
            pred_segments = []
            for number, (segment, category_id) in enumerate(by_task["panoptic"], start=1):
                pred_ids[segment.mask()] = number
                pred_segments.append(PanopticSegment(number, category_id))
            panoptic_stats.append(panoptic_image_stats(gt_ids, gt_segments, pred_ids, pred_segments))
        if run_semantic:
            pred_semantic = np.full(size, -1, dtype=np.int64)  # -1: no class predicted here
            for segment, category_id in by_task["semantic"]:
                pred_semantic[segment.mask()] = category_id
            semantic_total.add(semantic_image_confusion(ground_truth.semantic(gt_ids, gt_segments), pred_semantic,
                                                        ignore_index=IGNORE_INDEX))
        if run_instance:
            detections.extend({"image_id": image["id"], "category_id": category_id, "segmentation": segment.rle,
                               "score": segment.score} for segment, category_id in by_task["instance"])

    report: dict = {"split": ground_truth.split, "images": len(ground_truth.images),
                    "images_without_predictions": missing, "unknown_labels": unknown_labels}
    if run_panoptic:
        report["panoptic"] = summarize_panoptic(accumulate_panoptic_stats(panoptic_stats), ground_truth.categories)
    if run_instance:
        report["instance"] = mask_average_precision(ground_truth.instances, detections,
                                                    image_ids=[image["id"] for image in ground_truth.images])
    if run_semantic:
        report["semantic"] = summarize_semantic(semantic_total, ground_truth.categories)
    return report


def format_report(report: Mapping) -> str:
    """A plain-text table of the headline numbers and per-class scores."""
    lines = [f"split {report['split']}: {report['images']} images "
             f"({report['images_without_predictions']} without predictions)"]
    if report.get("unknown_labels"):
        lines.append(f"segments with labels not in the ground truth (skipped): {report['unknown_labels']}")
    if "panoptic" in report:
        panoptic = report["panoptic"]
        lines.append(f"{'':10}{'PQ':>8}{'SQ':>8}{'RQ':>8}{'#cls':>6}")
        for group in ("all", "things", "stuff"):
            row = panoptic[group]
            lines.append(f"{group:10}{row['pq']:8.2f}{row['sq']:8.2f}{row['rq']:8.2f}{row['n']:6d}")
    if "instance" in report:
        instance = report["instance"]
        lines.append("mask AP   " + "  ".join(f"{key}={instance[key]:.2f}" for key in
                                              ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")))
    if "semantic" in report:
        lines.append(f"mIoU {report['semantic']['miou']:.2f}   pixel accuracy {report['semantic']['pixel_accuracy']:.2f}")
    names = sorted(set(report.get("panoptic", {}).get("per_class", {}))
                   | set(report.get("instance", {}).get("per_class", {}))
                   | set(report.get("semantic", {}).get("per_class", {})))
    if names:
        lines.append(f"{'class':12}{'PQ':>8}{'SQ':>8}{'RQ':>8}{'AP':>8}{'IoU':>8}")
        for name in names:
            cells = []
            panoptic_row = report.get("panoptic", {}).get("per_class", {}).get(name)
            cells += [panoptic_row[k] if panoptic_row else None for k in ("pq", "sq", "rq")]
            cells.append(report.get("instance", {}).get("per_class", {}).get(name))
            cells.append(report.get("semantic", {}).get("per_class", {}).get(name))
            lines.append(f"{name:12}" + "".join(f"{c:8.2f}" if c is not None else f"{'-':>8}" for c in cells))
    return "\n".join(lines)


def write_report(report: Mapping, path: str, *, storage_options: dict | None = None) -> None:
    """Writes the report as JSON to a local path or URI."""
    import fsspec

    with fsspec.open(path, "w", **(storage_options or {})) as handle:
        json.dump(report, handle, indent=2)
