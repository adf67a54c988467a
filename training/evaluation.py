"""Scores segment predictions against a COCO-format split: PQ (panoptic), mask AP (instance), mIoU (semantic).

Predictions are always rows of the labeling job's segments table (`pipeline.records.SEGMENTS_SCHEMA`), from:
- a model directory, run here (`predict_segments`) with the job's own decode, preprocessing, forward pass and
  post-processing (`pipeline.postprocess`), so a model scored here and its labeling run's tables agree, or
- a labeling run's tables (`read_run_predictions`): committed batches only, the latest row per image, exactly
  what the job itself counts (a killed run's partial files are never scored), or
- a COCO export of those tables (`pipeline.coco_export.read_coco_export`).
All go through the same `score_predictions`. Images are matched by file name (the last part of `image_uri`
against the COCO `file_name`); labels by class name.
"""
from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pyarrow as pa
from pycocotools import mask as mask_utils

from pipeline.coco_export import read_coco_export
from pipeline.device_postprocess import PostprocessSettings
from pipeline.inference import InferenceStage
from pipeline.model_spec import resolve_model
from pipeline.postprocess import compressed_masks, segments_table
from pipeline.preprocess import PreprocessStage
from pipeline.records import FETCHED_SCHEMA, SEGMENTS_SCHEMA, TASKS
from pipeline.rle import run_lengths_column
from pipeline.run_tables import read_run_tables
from pipeline.storage import StorageConfig
from training.metrics import (PanopticSegment, SemanticConfusion, accumulate_panoptic_stats, mask_average_precision,
                              panoptic_image_stats, semantic_image_confusion, summarize_panoptic, summarize_semantic)
from training.storage import DatasetLocation, open_location

__all__ = ["TASKS", "Predictions", "GroundTruthSplit", "load_ground_truth", "predict_segments",
           "read_run_predictions", "read_export_predictions", "score_predictions", "format_report", "write_report", "stuff_label_ids",
           "image_key"]

IGNORE_INDEX = 255


@dataclass
class Predictions:
    """Segments in the segments-table schema, and the images they cover (an image labeled 'ok' with no
    segment is a prediction of nothing, not a missing prediction)."""

    segments: pa.Table  # SEGMENTS_SCHEMA rows
    labeled_image_uris: set[str]


def _rle_mask(row: Mapping) -> np.ndarray:
    """(height, width) bool mask of a segments-table row."""
    return mask_utils.decode({"size": [int(v) for v in row["rle_size"]],
                              "counts": row["rle_counts"].encode("ascii")}).astype(bool)


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

    def image_uri(self, image: Mapping) -> str:
        return self.location.describe(self.image_path(image))

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


def load_ground_truth(root: str, split: str, *, storage: StorageConfig | dict | None = None,
                      limit: int | None = None) -> GroundTruthSplit:
    """Reads annotations/{panoptic,instances}_{split}.json under `root` (local or s3://); at least one must exist.

    `storage`: a resolved StorageConfig, or --storage-options resolved over the AWS_* variables."""
    location = open_location(root, storage)
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


def predict_segments(model_uri: str, ground_truth: GroundTruthSplit, *, settings: PostprocessSettings,
                     storage: StorageConfig | None = None, batch_size: int = 8, device: str = "cpu",
                     dtype: str = "float32") -> Predictions:
    """Runs the model in `model_uri` on every image of the split through the labeling job's own stages (decode +
    resize, normalise + forward + post-processing on `device`, RLE), so scores here and a run's tables agree."""
    storage = storage or ground_truth.location.storage
    spec = resolve_model(model_uri, storage)
    preprocess = PreprocessStage(spec=spec)
    inference = InferenceStage(spec=spec, storage=storage, settings=settings, dtype=dtype, device=device)
    tables = []
    images = list(ground_truth.images)
    for start in range(0, len(images), batch_size):
        fetched = pa.Table.from_pylist(
            [{"image_uri": ground_truth.image_uri(image), "image_id": image["file_name"],
              "data": storage.read_bytes(ground_truth.image_uri(image))} for image in images[start:start + batch_size]],
            schema=FETCHED_SCHEMA)
        segmented = inference(preprocess(fetched))
        rows = segmented.drop_columns(["run_lengths"]).to_pylist()
        for row in rows:
            if row["error_stage"]:
                raise ValueError(f"{row['image_uri']}: {row['error_stage']} failed: {row['error_message']}")
        masks = [compressed_masks(row, runs) for row, runs in
                 zip(rows, run_lengths_column(segmented.column("run_lengths")))]
        tables.append(segments_table(rows, masks, id2label=spec.id2label, model=spec.model_id, run_id="evaluation"))
    return Predictions(segments=pa.concat_tables(tables) if tables else SEGMENTS_SCHEMA.empty_table(),
                       labeled_image_uris={ground_truth.image_uri(image) for image in images})


def read_run_predictions(output_uri: str, *, storage: StorageConfig | None = None) -> Predictions:
    """The committed segments of a labeling run (its --output, local or s3://)."""
    tables = read_run_tables(output_uri, StorageConfig.coerce(storage))
    return Predictions(segments=tables.segments, labeled_image_uris=tables.ok_image_uris())


def read_export_predictions(export_uri: str, *, storage: StorageConfig | None = None) -> Predictions:
    """The panoptic and instance segments of a COCO export (jobs/export_coco.py --output)."""
    tables = read_coco_export(export_uri, storage=StorageConfig.coerce(storage))
    return Predictions(segments=tables.segments, labeled_image_uris=tables.ok_image_uris())


def score_predictions(ground_truth: GroundTruthSplit, predictions: Predictions, *,
                      tasks: Sequence[str] = TASKS) -> dict:
    """PQ / mask AP / mIoU of `predictions` on every image of `ground_truth` (matched by file name)."""
    category_by_name = {c["name"]: c for c in ground_truth.categories}
    if ground_truth.instances is not None:
        for record in ground_truth.instances["categories"]:
            category_by_name.setdefault(record["name"], dict(record, isthing=1))
    keys = [image_key(image["file_name"]) for image in ground_truth.images]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{ground_truth.split} has several images with the same file name; predictions are "
                         f"matched by file name, so they must be unique")
    labeled = {image_key(uri) for uri in predictions.labeled_image_uris}
    rows_by_key: dict[str, list[dict]] = {}
    for row in predictions.segments.select(["image_uri", "task", "label", "score", "rle_size",
                                            "rle_counts"]).to_pylist():
        rows_by_key.setdefault(image_key(row["image_uri"]), []).append(row)

    unknown_labels: dict[str, int] = {}
    panoptic_stats, semantic_total, detections = [], SemanticConfusion(), []
    missing = 0
    run_panoptic = "panoptic" in tasks and ground_truth.has_panoptic
    run_semantic = "semantic" in tasks and ground_truth.has_panoptic
    run_instance = "instance" in tasks and ground_truth.instances is not None
    for image, key in zip(ground_truth.images, keys):
        missing += key not in labeled
        size = (int(image["height"]), int(image["width"]))
        by_task: dict[str, list[tuple[dict, int]]] = {task: [] for task in TASKS}
        for row in rows_by_key.get(key, []) if key in labeled else []:
            category = category_by_name.get(row["label"])
            if category is None:
                unknown_labels[row["label"]] = unknown_labels.get(row["label"], 0) + 1
                continue
            if tuple(int(v) for v in row["rle_size"]) != size:
                raise ValueError(f"a {row['task']} segment of {key} has size {list(row['rle_size'])} but the "
                                 f"image is {list(size)}; predictions must be at the original image size")
            by_task.setdefault(row["task"], []).append((row, int(category["id"])))

        if run_panoptic or run_semantic:
            gt_ids, gt_segments = ground_truth.panoptic(image)
        if run_panoptic:
            pred_ids = np.zeros(size, dtype=np.int64)
            pred_segments = []
            for number, (row, category_id) in enumerate(by_task["panoptic"], start=1):
                pred_ids[_rle_mask(row)] = number
                pred_segments.append(PanopticSegment(number, category_id))
            panoptic_stats.append(panoptic_image_stats(gt_ids, gt_segments, pred_ids, pred_segments))
        if run_semantic:
            pred_semantic = np.full(size, -1, dtype=np.int64)  # -1: no class predicted here
            for row, category_id in by_task["semantic"]:
                pred_semantic[_rle_mask(row)] = category_id
            semantic_total.add(semantic_image_confusion(ground_truth.semantic(gt_ids, gt_segments), pred_semantic,
                                                        ignore_index=IGNORE_INDEX))
        if run_instance:
            detections.extend({"image_id": image["id"], "category_id": category_id,
                               "segmentation": {"size": list(row["rle_size"]), "counts": row["rle_counts"]},
                               "score": 1.0 if row["score"] is None else float(row["score"])}
                              for row, category_id in by_task["instance"])

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


def write_report(report: Mapping, path: str, *, storage: StorageConfig | None = None) -> None:
    """Writes the report as JSON to a local path or URI."""
    StorageConfig.coerce(storage).write_text(path, json.dumps(report, indent=2))
