"""Post-process actors: logits -> panoptic / instance / semantic segments at the original size -> COCO RLE.

All three tasks come from the same forward pass, through the checkpoint processor's own post-processors,
with each image's original (upright) size as the target size. A dense mask lives only inside this stage:
it is encoded with pycocotools right away, and only RLE strings, boxes and areas leave. The stage also
writes its batch's Parquet files (see `pipeline.sinks`) and returns one small row per image to the driver.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pyarrow as pa
from pycocotools import mask as coco_mask

from pipeline.checkpoint import load_processor, localize_checkpoint
from pipeline.progress import report_progress
from pipeline.records import (IMAGES_SCHEMA, SEGMENTS_SCHEMA, TASKS, ImageRecord, SegmentRecord, StageError,
                              table_from_records, unpack_array)
from pipeline.sinks import batch_file_stem, write_batch
from pipeline.storage import StorageConfig

__all__ = ["PostprocessSettings", "PredictedSegment", "predict_segments", "encode_mask", "segment_records",
           "PostprocessStage", "read_id2label"]


@dataclass(frozen=True)
class PostprocessSettings:
    """The post-processors' knobs (transformers' names and defaults) and which tasks to produce."""

    tasks: tuple[str, ...] = TASKS
    threshold: float = 0.5
    mask_threshold: float = 0.5
    overlap_threshold: float = 0.8
    label_ids_to_fuse: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"--tasks {','.join(self.tasks)!r}: choose one or more of {','.join(TASKS)}")


@dataclass
class PredictedSegment:
    """One segment with its dense mask; exists only inside the post-process stage."""

    task: str
    segment_id: int
    label_id: int
    score: float | None
    was_fused: bool
    mask: np.ndarray  # (height, width) bool


def predict_segments(processor, class_logits: np.ndarray, mask_logits: np.ndarray, *, height: int, width: int,
                     settings: PostprocessSettings) -> Iterator[PredictedSegment]:
    """Segments of one image for every requested task, masks at (height, width).

    class_logits: (queries, labels + 1); mask_logits: (queries, H'/4, W'/4), float32.
    """
    import torch

    outputs = SimpleNamespace(class_queries_logits=torch.from_numpy(class_logits)[None],
                              masks_queries_logits=torch.from_numpy(mask_logits)[None])
    target_sizes = [(int(height), int(width))]
    if "panoptic" in settings.tasks:
        yield from _panoptic_segments(processor, outputs, target_sizes, settings)
    if "instance" in settings.tasks:
        yield from _instance_segments(processor, outputs, target_sizes, settings)
    if "semantic" in settings.tasks:
        yield from _semantic_segments(processor, outputs, target_sizes)


def _panoptic_segments(processor, outputs, target_sizes, settings) -> Iterator[PredictedSegment]:
    result = processor.post_process_panoptic_segmentation(
        outputs, threshold=settings.threshold, mask_threshold=settings.mask_threshold,
        overlap_mask_area_threshold=settings.overlap_threshold,
        label_ids_to_fuse=set(settings.label_ids_to_fuse), target_sizes=target_sizes,
        # transformers' numbering can give the segment after a reused fused id an id already taken by
        # another label; the map could then not tell the two apart.
        unique_segment_ids=True)[0]
    segmentation = _as_numpy(result["segmentation"])  # (height, width) segment ids, 0 or -1 = none
    # Fused stuff segments appear once per fused query under the same id: one row per id, best score.
    by_id: dict[int, dict] = {}
    for info in result["segments_info"]:
        kept = by_id.setdefault(int(info["id"]), dict(info))
        kept["score"] = max(float(kept["score"]), float(info["score"]))
        kept["was_fused"] = bool(kept.get("was_fused")) or bool(info.get("was_fused"))
    for segment_id, info in by_id.items():
        yield PredictedSegment("panoptic", segment_id, int(info["label_id"]), float(info["score"]),
                               bool(info.get("was_fused", False)), segmentation == segment_id)


def _instance_segments(processor, outputs, target_sizes, settings) -> Iterator[PredictedSegment]:
    # Binary maps keep each instance's full mask; the merged id map would cut overlapping instances.
    result = processor.post_process_instance_segmentation(
        outputs, threshold=settings.threshold, mask_threshold=settings.mask_threshold,
        overlap_mask_area_threshold=settings.overlap_threshold, target_sizes=target_sizes,
        return_binary_maps=True)[0]
    segments_info = result["segments_info"]
    if not segments_info:
        return
    binary_maps = _as_numpy(result["segmentation"])  # (instances, height, width) in {0, 1}
    for position, info in enumerate(segments_info):
        yield PredictedSegment("instance", int(info["id"]), int(info["label_id"]), float(info["score"]),
                               bool(info.get("was_fused", False)), binary_maps[position] > 0.5)


def _semantic_segments(processor, outputs, target_sizes) -> Iterator[PredictedSegment]:
    label_map = _as_numpy(processor.post_process_semantic_segmentation(outputs, target_sizes=target_sizes)[0])
    for label_id in np.unique(label_map):  # one segment per class present; segment_id = label_id
        yield PredictedSegment("semantic", int(label_id), int(label_id), None, False, label_map == label_id)


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)


def encode_mask(mask: np.ndarray) -> dict:
    """A (height, width) boolean mask -> {'size': [h, w], 'counts': str, 'area': int, 'bbox': [x, y, w, h]}."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii"),
            "area": int(coco_mask.area(rle)), "bbox": [float(v) for v in coco_mask.toBbox(rle)]}


def segment_records(segments: Iterator[PredictedSegment], *, image_uri: str, image_id: str, height: int,
                    width: int, id2label: dict, model: str, run_id: str) -> list[SegmentRecord]:
    records = []
    for segment in segments:
        encoded = encode_mask(segment.mask)
        score = None if segment.score is None else float(segment.score)
        records.append(SegmentRecord(
            image_uri=image_uri, image_id=image_id, height=height, width=width, task=segment.task,
            segment_id=segment.segment_id, label_id=segment.label_id,
            label=id2label.get(segment.label_id, str(segment.label_id)), score=score, area=encoded["area"],
            bbox=encoded["bbox"], rle_size=encoded["size"], rle_counts=encoded["counts"],
            was_fused=segment.was_fused, model=model, run_id=run_id))
    return records


def read_id2label(local_dir: Path) -> dict[int, str]:
    config = json.loads((Path(local_dir) / "config.json").read_text())
    return {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}


class PostprocessStage:
    """Ray Data actor: PREDICTED rows -> segments + images Parquet files for the batch -> images rows."""

    def __init__(self, *, model_uri: str, storage: StorageConfig, output_uri: str, settings: PostprocessSettings,
                 model_name: str, run_id: str, tracker=None) -> None:
        local = localize_checkpoint(model_uri, storage)
        self._processor = load_processor(local)
        self._id2label = read_id2label(local)
        self._storage = storage
        self._output_uri = output_uri
        self._settings = settings
        self._model_name = model_name
        self._run_id = run_id
        self._tracker = tracker

    def __call__(self, batch: pa.Table) -> pa.Table:
        image_records: list[ImageRecord] = []
        segment_rows: list[SegmentRecord] = []
        for row in batch.to_pylist():
            image_record, segments = self._process_row(row)
            image_records.append(image_record)
            segment_rows.extend(segments)
        images = table_from_records(image_records, IMAGES_SCHEMA)
        segments_table = table_from_records(segment_rows, SEGMENTS_SCHEMA)
        stem = batch_file_stem(self._run_id, [r.image_uri for r in image_records])
        write_batch(self._output_uri, self._storage, stem, segments=segments_table, images=images)
        report_progress(self._tracker, "postprocess", len(image_records))
        return images

    def _process_row(self, row: dict) -> tuple[ImageRecord, list[SegmentRecord]]:
        base = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": row.get("height"),
                "width": row.get("width"), "run_id": self._run_id}
        error = StageError.from_row(row)
        if error is None:
            try:
                segments = segment_records(
                    predict_segments(self._processor, unpack_array(row["class_logits"], row["class_shape"]),
                                     unpack_array(row["mask_logits"], row["mask_shape"]),
                                     height=row["height"], width=row["width"], settings=self._settings),
                    image_uri=row["image_uri"], image_id=row["image_id"], height=row["height"],
                    width=row["width"], id2label=self._id2label, model=self._model_name, run_id=self._run_id)
            except Exception as exception:  # noqa: BLE001 - the image becomes an error row, the batch goes on
                error = StageError.from_exception("postprocess", exception)
        if error is not None:
            return ImageRecord(status="error", **base, error_stage=error.stage, error_type=error.type,
                               error_message=error.message), []
        counts = {f"{task}_segments": sum(1 for s in segments if s.task == task) for task in self._settings.tasks}
        return ImageRecord(status="ok", **base, **counts), segments
