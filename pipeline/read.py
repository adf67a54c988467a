"""Listed URIs -> their bytes: the read stage, run as light Ray tasks in front of the decode actors.

Object stores answer each GET after tens of milliseconds of latency, so a batch's objects are fetched by a
few threads at once (local files are read one after the other: threads buy nothing there).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from pipeline.progress import report_progress
from pipeline.records import FETCHED_SCHEMA, NO_ERROR_COLUMNS, StageError
from pipeline.storage import StorageConfig, is_local_uri

__all__ = ["DEFAULT_MAX_OBJECT_BYTES", "REMOTE_READ_THREADS", "read_objects"]

DEFAULT_MAX_OBJECT_BYTES = 256 * 1024 * 1024
REMOTE_READ_THREADS = 16


def read_objects(batch: pa.Table, *, storage: StorageConfig, max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES,
                 tracker=None) -> pa.Table:
    """Adds each object's bytes; an object that cannot be read becomes an error row (stage 'read')."""
    listed = batch.to_pylist()

    def fetch(row: dict) -> dict:
        try:
            filesystem, path = storage.filesystem(row["image_uri"])
            with filesystem.open(path, "rb") as handle:
                data = handle.read(max_object_bytes + 1)
            if len(data) > max_object_bytes:
                raise ValueError(f"object is larger than the limit of {max_object_bytes} bytes "
                                 "(raise --max-object-bytes to accept it)")
            return {**row, "data": data, **NO_ERROR_COLUMNS}
        except Exception as error:  # noqa: BLE001 - every failure becomes that image's error row
            return {**row, "data": None, **StageError.from_exception("read", error).as_columns()}

    remote = [row for row in listed if not is_local_uri(row["image_uri"])]
    if len(remote) > 1:
        with ThreadPoolExecutor(max_workers=min(REMOTE_READ_THREADS, len(listed))) as pool:
            rows = list(pool.map(fetch, listed))
    else:
        rows = [fetch(row) for row in listed]
    report_progress(tracker, "read", len(rows))
    return pa.Table.from_pylist(rows, schema=FETCHED_SCHEMA)
