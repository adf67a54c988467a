"""Write actors: segment rows (ids, labels, scores, run lengths) -> COCO RLE strings -> segments + images Parquet.

The model stage has already post-processed every task on its device; what arrives here is per segment its
column-major run lengths, area and box. pycocotools turns the run lengths into compressed RLE strings (never a
dense mask), and the batch is committed with the sinks' protocol: segments file first, then images file.
One small images row per image goes back to the driver.
"""
from __future__ import annotations

from itertools import chain

import numpy as np
import pyarrow as pa

from pipeline.model_spec import ModelSpec
from pipeline.progress import report_progress
from pipeline.records import IMAGES_SCHEMA, SEGMENTS_SCHEMA, ImageRecord, SegmentRecord, StageError, table_from_records
from pipeline.rle import CompressedMasks, rle_strings, run_lengths_column
from pipeline.sinks import batch_file_stem, write_batch
from pipeline.storage import StorageConfig

__all__ = ["PostprocessStage", "compressed_masks", "segments_table", "segment_records"]


def compressed_masks(row: dict, run_lengths: np.ndarray) -> CompressedMasks:
    """One SEGMENTED row's segments (their uint32 run lengths in turn) as pycocotools compresses them, with the
    areas and boxes the model stage computed."""
    segments = len(row["segment_task"])
    bounds = np.cumsum([0] + list(row["segment_runs"]))
    if len(bounds) != segments + 1 or bounds[-1] != len(run_lengths):
        raise ValueError(f"{segments} segments with {len(bounds) - 1} run counts adding up to "
                         f"{bounds[-1]}, but {len(run_lengths)} run lengths")
    area, bbox = np.asarray(row["segment_area"], np.int64), np.asarray(row["segment_bbox"], np.float64)
    if len(area) != segments or len(bbox) != 4 * segments:
        raise ValueError(f"{segments} segments with {len(area)} areas and {len(bbox)} box values")
    return CompressedMasks(
        counts=rle_strings([run_lengths[bounds[k]:bounds[k + 1]] for k in range(segments)], height=row["height"],
                           width=row["width"]), area=area, bbox=bbox.reshape(segments, 4))


def segments_table(rows: list[dict], masks: list[CompressedMasks], *, id2label: dict, model: str,
                   run_id: str) -> pa.Table:
    """SEGMENTED rows without errors and their `compressed_masks` -> the segments table (SEGMENTS_SCHEMA).

    Built a column at a time from each row's per-segment lists: no Python object per segment."""
    segment_counts = [len(row["segment_task"]) for row in rows]

    def per_segment(name: str) -> list:
        return list(chain.from_iterable(row[name] for row in rows))

    def per_image(name: str) -> list:
        return list(chain.from_iterable([row[name]] * count for row, count in zip(rows, segment_counts)))

    label_ids = per_segment("segment_label_id")
    sizes = np.array([[row["height"], row["width"]] for row in rows], dtype=np.int32).reshape(-1, 2)
    columns = {
        "image_uri": per_image("image_uri"), "image_id": per_image("image_id"), "height": per_image("height"),
        "width": per_image("width"), "task": per_segment("segment_task"), "segment_id": per_segment("segment_id"),
        "label_id": label_ids, "label": [id2label.get(label_id, str(label_id)) for label_id in label_ids],
        "score": per_segment("segment_score"),
        "area": np.concatenate([m.area for m in masks]).astype(np.int64) if masks else np.zeros(0, np.int64),
        "bbox": np.concatenate([m.bbox for m in masks]) if masks else np.zeros((0, 4)),
        "rle_size": np.repeat(sizes, segment_counts, axis=0),
        "rle_counts": list(chain.from_iterable(m.counts for m in masks)),
        "was_fused": per_segment("segment_was_fused"), "model": [model] * len(label_ids),
        "run_id": [run_id] * len(label_ids),
    }
    return pa.Table.from_arrays([_column(columns[field.name], field.type) for field in SEGMENTS_SCHEMA],
                                schema=SEGMENTS_SCHEMA)


def _column(values: list | np.ndarray, field_type: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(field_type):  # values: (rows, list_size) array
        return pa.FixedSizeListArray.from_arrays(
            pa.array(values.astype(field_type.value_type.to_pandas_dtype()).ravel()), type=field_type)
    return pa.array(values, type=field_type)


def segment_records(row: dict, run_lengths: np.ndarray, *, id2label: dict, model: str,
                    run_id: str) -> list[SegmentRecord]:
    """One SEGMENTED row (and its uint32 run lengths) -> the image's segments table rows, as records."""
    table = segments_table([row], [compressed_masks(row, run_lengths)], id2label=id2label, model=model,
                           run_id=run_id)
    return [SegmentRecord(**values) for values in table.to_pylist()]


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
        ok_rows: list[dict] = []
        ok_masks: list[CompressedMasks] = []
        run_lengths = run_lengths_column(batch.column("run_lengths"))
        for row, runs in zip(batch.drop_columns(["run_lengths"]).to_pylist(), run_lengths):
            base = {"image_uri": row["image_uri"], "image_id": row["image_id"], "height": row.get("height"),
                    "width": row.get("width"), "run_id": self._run_id}
            error = StageError.from_row(row)
            if error is None:
                try:
                    masks = compressed_masks(row, runs)
                except Exception as exception:  # noqa: BLE001 - the image becomes an error row, the batch goes on
                    error = StageError.from_exception("postprocess", exception)
            if error is not None:
                image_records.append(ImageRecord(status="error", **base, error_stage=error.stage,
                                                 error_type=error.type, error_message=error.message))
                continue
            ok_rows.append(row)
            ok_masks.append(masks)
            image_records.append(ImageRecord(status="ok", **base, **{
                f"{task}_segments": row["segment_task"].count(task) for task in self._tasks}))
        images = table_from_records(image_records, IMAGES_SCHEMA)
        segments = segments_table(ok_rows, ok_masks, id2label=self._id2label, model=self._model_id,
                                  run_id=self._run_id)
        stem = batch_file_stem(self._run_id, [r.image_uri for r in image_records])
        write_batch(self._output_uri, self._storage, stem, segments=segments, images=images)
        report_progress(self._tracker, "postprocess", len(image_records))
        return images
