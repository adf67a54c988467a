"""Row schemas of the labeling pipeline: what crosses each stage boundary and what lands in Parquet.

Every stage exchanges pyarrow tables with an explicit schema, so blocks never disagree on a column's type
(an all-null column would otherwise become `null` in one block and `string` in the next). No float tensor
crosses a stage boundary: into the model stage go uint8 pixels (raw bytes plus their shape, flat primitive
columns that Ray Data sizes correctly), out of it per segment only ids, label, score, area, box and run lengths.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = [
    "TASKS", "ERROR_STAGES", "LISTED_SCHEMA", "FETCHED_SCHEMA", "PREPROCESSED_SCHEMA", "SEGMENTED_SCHEMA",
    "SEGMENTS_SCHEMA", "IMAGES_SCHEMA", "StageError", "SegmentRecord", "ImageRecord",
    "binary_column_views", "table_from_records",
]

TASKS: tuple[str, ...] = ("panoptic", "instance", "semantic")
ERROR_STAGES: tuple[str, ...] = ("read", "decode", "preprocess", "inference", "postprocess")

_ERROR_FIELDS = [
    pa.field("error_stage", pa.string()),
    pa.field("error_type", pa.string()),
    pa.field("error_message", pa.string()),
]

LISTED_SCHEMA = pa.schema([pa.field("image_uri", pa.string()), pa.field("image_id", pa.string())])

FETCHED_SCHEMA = pa.schema([*LISTED_SCHEMA, pa.field("data", pa.large_binary()), *_ERROR_FIELDS])

PREPROCESSED_SCHEMA = pa.schema([
    *LISTED_SCHEMA,
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("pixels", pa.large_binary()),  # uint8 (3, H', W'), C order: resized, not yet normalised
    pa.field("pixel_shape", pa.list_(pa.int32())),
    *_ERROR_FIELDS,
])

# One row per image; the segment_* lists run in parallel, one entry per segment of every task.
SEGMENTED_SCHEMA = pa.schema([
    *LISTED_SCHEMA,
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("segment_task", pa.list_(pa.string())),
    pa.field("segment_id", pa.list_(pa.int32())),
    pa.field("segment_label_id", pa.list_(pa.int32())),
    pa.field("segment_score", pa.list_(pa.float32())),  # null entries for semantic segments
    pa.field("segment_was_fused", pa.list_(pa.bool_())),
    pa.field("segment_runs", pa.list_(pa.int32())),  # how many run lengths each segment has
    pa.field("segment_area", pa.list_(pa.int64())),  # pixels of each segment
    pa.field("segment_bbox", pa.list_(pa.int32())),  # COCO x, y, width, height of each segment in turn
    pa.field("run_lengths", pa.large_binary()),  # every segment's column-major COCO run lengths in turn, packed
    # by pipeline.rle.pack_run_lengths
    *_ERROR_FIELDS,
])

SEGMENTS_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    pa.field("task", pa.string()),
    pa.field("segment_id", pa.int32()),
    pa.field("label_id", pa.int32()),
    pa.field("label", pa.string()),
    pa.field("score", pa.float32()),  # null for semantic segments: a class map has no per-segment score
    pa.field("area", pa.int64()),
    pa.field("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, width, height]
    pa.field("rle_size", pa.list_(pa.int32(), 2)),  # [height, width]
    pa.field("rle_counts", pa.string()),  # compressed COCO RLE, utf-8
    pa.field("was_fused", pa.bool_()),
    pa.field("model", pa.string()),
    pa.field("run_id", pa.string()),
])

IMAGES_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string()),
    pa.field("image_id", pa.string()),
    pa.field("status", pa.string()),  # "ok" | "error"
    pa.field("height", pa.int32()),
    pa.field("width", pa.int32()),
    *[pa.field(f"{task}_segments", pa.int32()) for task in TASKS],  # null when the task was not run
    *_ERROR_FIELDS,
    pa.field("run_id", pa.string()),
])


@dataclass(frozen=True)
class StageError:
    """Why one image failed, and where: carried as columns instead of raised, so no block is ever dropped."""

    stage: str
    type: str
    message: str

    @classmethod
    def from_exception(cls, stage: str, error: BaseException) -> "StageError":
        message = str(error) or repr(error)
        return cls(stage=stage, type=type(error).__name__, message=message[:2000])

    def as_columns(self) -> dict:
        return {"error_stage": self.stage, "error_type": self.type, "error_message": self.message}

    @staticmethod
    def from_row(row: dict) -> "StageError | None":
        if not row.get("error_stage"):
            return None
        return StageError(row["error_stage"], row.get("error_type") or "", row.get("error_message") or "")


NO_ERROR_COLUMNS: dict = {"error_stage": None, "error_type": None, "error_message": None}


@dataclass
class SegmentRecord:
    """One row of `segments/*.parquet`."""

    image_uri: str
    image_id: str
    height: int
    width: int
    task: str
    segment_id: int
    label_id: int
    label: str
    score: float | None
    area: int
    bbox: list[float]
    rle_size: list[int]
    rle_counts: str
    was_fused: bool
    model: str
    run_id: str


@dataclass
class ImageRecord:
    """One row of `images/*.parquet`: every input image gets exactly one."""

    image_uri: str
    image_id: str
    status: str
    height: int | None = None
    width: int | None = None
    panoptic_segments: int | None = None
    instance_segments: int | None = None
    semantic_segments: int | None = None
    error_stage: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    run_id: str = ""


def binary_column_views(column: pa.ChunkedArray | pa.Array, dtype=np.uint8) -> list[np.ndarray | None]:
    """Each value of a (large_)binary column as a flat read-only numpy view of `dtype`, without copying."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views: list[np.ndarray | None] = []
    for chunk in chunks:
        offsets_buffer, data_buffer = chunk.buffers()[1:3]
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset:chunk.offset + len(chunk) + 1]
        data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)
        for index in range(len(chunk)):
            views.append(data[offsets[index]:offsets[index + 1]].view(dtype) if valid[index] else None)
    return views


def table_from_records(records: list, schema: pa.Schema) -> pa.Table:
    """Rows (dicts or record dataclasses) as a table with exactly `schema`; a field a dict lacks is null.

    Column by column and without `dataclasses.asdict` (which deep-copies every list in every record): the
    write actors build tens of thousands of segment rows a second this way."""
    def column(name: str) -> list:
        return [getattr(record, name) if hasattr(record, "__dataclass_fields__") else record.get(name)
                for record in records]

    return pa.Table.from_arrays([pa.array(column(field.name), type=field.type) for field in schema], schema=schema)
