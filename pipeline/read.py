"""Listed URIs -> their bytes: the read stage, run as light Ray tasks in front of the decode actors."""
from __future__ import annotations

import pyarrow as pa

from pipeline.progress import report_progress
from pipeline.records import FETCHED_SCHEMA, NO_ERROR_COLUMNS, StageError
from pipeline.storage import StorageConfig

__all__ = ["DEFAULT_MAX_OBJECT_BYTES", "read_objects"]

DEFAULT_MAX_OBJECT_BYTES = 256 * 1024 * 1024


def read_objects(batch: pa.Table, *, storage: StorageConfig, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 tracker=None) -> pa.Table:
    """Adds each object's bytes; an object that cannot be read becomes an error row (stage 'read')."""
    rows = []
    for row in batch.to_pylist():
        try:
            filesystem, path = storage.filesystem(row["image_uri"])
            with filesystem.open(path, "rb") as handle:
                data = handle.read(max_object_bytes + 1)
            if len(data) > max_object_bytes:
                raise ValueError(f"object is larger than the limit of {max_object_bytes} bytes "
                                 "(raise --max-object-bytes to accept it)")
            rows.append({**row, "data": data, **NO_ERROR_COLUMNS})
        except Exception as error:  # noqa: BLE001 - every failure becomes that image's error row
            rows.append({**row, "data": None, **StageError.from_exception("read", error).as_columns()})
    report_progress(tracker, "read", len(rows))
    return pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA)
