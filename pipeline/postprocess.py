"""Write actors: segment rows (ids, labels, scores, run lengths) -> COCO RLE strings -> segments + images Parquet.

The model stage has already post-processed every task on its device; what arrives here is per segment its
column-major run lengths. pycocotools turns them into compressed RLE strings, areas and boxes (never a
dense mask), and the batch is committed with the sinks' protocol: segments file first, then images file.
One small images row per image goes back to the driver.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.model_spec import ModelSpec
from pipeline.progress import report_progress
from pipeline.records import (IMAGES_SCHEMA, SEGMENTS_SCHEMA, ImageRecord, SegmentRecord, StageError,
                              table_from_records)
from pipeline.rle import encode_run_lengths, run_lengths_column
from pipeline.sinks import batch_file_stem, write_batch
from pipeline.storage import StorageConfig

__all__ = ["PostprocessStage", "segment_records"]


def segment_records(row: dict, run_lengths: np.ndarray, *, id2label: dict, model: str,
                    run_id: str) -> list[SegmentRecord]:
    """One SEGMENTED row (and its uint32 run lengths) -> the image's segments table rows."""
    height, width = row["height"], row["width"]
    bounds = np.cumsum([0] + list(row["segment_runs"]))
    encoded = encode_run_lengths([run_lengths[bounds[k]:bounds[k + 1]] for k in range(len(bounds) - 1)],
                                 height=height, width=width)
    records = []
    for k, mask in enumerate(encoded):
        label_id = row["segment_label_id"][k]
        score = row["segment_score"][k]
        records.append(SegmentRecord(
            image_uri=row["image_uri"], image_id=row["image_id"], height=height, width=width,
            task=row["segment_task"][k], segment_id=row["segment_id"][k], label_id=label_id,
            label=id2label.get(label_id, str(label_id)), score=None if score is None else float(score),
            area=mask["area"], bbox=mask["bbox"], rle_size=mask["size"], rle_counts=mask["counts"],
            was_fused=row["segment_was_fused"][k], model=model, run_id=run_id))
    return records


class PostprocessStage:
    """Ray Data actor: SEGMENTED rows -> segments + images Parquet files for the batch -> images rows."""

    def __init__(self, *, spec: ModelSpec, storage: StorageConfig, output_uri: str, tasks: tuple[str, ...],
                 run_id: str, tracker=None) -> None:
        self._id2label = spec.id2label
        self._model_id = spec.model_id
        self._storage = storage
        self._output_uri = output_uri
        self._tasks = tasks
        self._run_id = run_id
        self._tracker = tracker

    def __call__(self, batch: pa.Table) -> pa.Table:
        image_records: list[ImageRecord] = []
        segment_rows: list[SegmentRecord] = []
        run_lengths = run_lengths_column(batch.column("run_lengths"))
        for row, runs in zip(batch.drop_columns(["run_lengths"]).to_pylist(), run_lengths):
            image_record, segments = self._process_row(row, runs)
            image_records.append(image_record)
            segment_rows.extend(segments)
        images = table_from_records(image_records, IMAGES_SCHEMA)
        segments_table = table_from_records(segment_rows, SEGMENTS_SCHEMA)
        stem = batch_file_stem(self._run_id, [r.image_uri for r in image_records])
        write_batch(self._output_uri, self._storage, stem, segments=segments_table, images=images)
        report_progress(self._tracker, "postprocess", len(image_records))
        return images

    def _process_row(self, row: dict, run_lengths: np.ndarray | None) -> tuple[ImageRecord, list[SegmentRecord]]:
        base = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": row.get("height"),
                "width": row.get("width"), "run_id": self._run_id}
        error = StageError.from_row(row)
        if error is None:
            try:
                segments = segment_records(row, run_lengths, id2label=self._id2label, model=self._model_id,
                                           run_id=self._run_id)
            except Exception as exception:  # noqa: BLE001 - the image becomes an error row, the batch goes on
                error = StageError.from_exception("postprocess", exception)
        if error is not None:
            return ImageRecord(status="error", **base, error_stage=error.stage, error_type=error.type,
                               error_message=error.message), []
        counts = {f"{task}_segments": sum(1 for s in segments if s.task == task) for task in self._tasks}
        return ImageRecord(status="ok", **base, **counts), segments
