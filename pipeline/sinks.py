"""Parquet output under `--output` (local or any fsspec URI): one segments file and one images file per batch.

A batch is `--images-per-file` images (default `DEFAULT_IMAGES_PER_FILE`): large enough that a 10M-image run
writes thousands of files per table, not hundreds of thousands, and that the segments files land in the size
range analytics engines read well (tens of MB for a COCO-sized model), small enough that a killed run loses
little work and a write actor's batch stays a few hundred MB.

Commit protocol, which is what makes resume safe:
- file names are `<run_id>-<hash of the batch's image URIs>.parquet`, so a retried batch overwrites its own
  files instead of adding new ones;
- the segments file is written before the images file, and an images file therefore only exists when its
  segments file is complete: an image counts as done only through its images row;
- on local disks each file is written under a hidden temporary name and renamed into place; object stores
  make an object visible only once its upload completes;
- names starting with '.' or '_' are ignored by readers (pyarrow, pandas, Spark), so leftovers of a killed
  run never show up in the tables, and `remove_partial_files` deletes them.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import StorageConfig, is_local_uri, join_uri

__all__ = ["SEGMENTS_DIR", "IMAGES_DIR", "DEFAULT_IMAGES_PER_FILE", "batch_file_stem", "write_batch",
           "write_table_file", "list_stems", "read_table_file", "read_table_files", "remove_table_file",
           "remove_partial_files", "write_json"]

SEGMENTS_DIR = "segments"
IMAGES_DIR = "images"
DEFAULT_IMAGES_PER_FILE = 2048
_TEMP_PREFIX = ".tmp-"
# Reads of many files overlap their round trips: an object store answers each GET after ~10-50 ms.
_READ_THREADS = 32


def batch_file_stem(run_id: str, image_uris: list[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(image_uris)).encode()).hexdigest()[:16]
    return f"{run_id}-{digest}"


def _table_path(output_uri: str, storage: StorageConfig, table: str, stem: str) -> tuple:
    filesystem, root = storage.filesystem(output_uri)
    return filesystem, posixpath.join(root, table, f"{stem}.parquet")


def write_table_file(output_uri: str, storage: StorageConfig, table_name: str, stem: str, table: pa.Table) -> None:
    """Writes `<output>/<table_name>/<stem>.parquet` so that it appears complete or not at all."""
    filesystem, path = _table_path(output_uri, storage, table_name, stem)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    payload = buffer.getvalue()
    if is_local_uri(output_uri):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        temporary = os.path.join(directory, f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
        with open(temporary, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    else:
        with filesystem.open(path, "wb") as handle:
            handle.write(payload)


def write_batch(output_uri: str, storage: StorageConfig, stem: str, *, segments: pa.Table, images: pa.Table) -> None:
    """Commits one batch: segments first, images last (the images file is the batch's 'done' marker)."""
    write_table_file(output_uri, storage, SEGMENTS_DIR, stem, segments)
    write_table_file(output_uri, storage, IMAGES_DIR, stem, images)


def list_stems(output_uri: str, storage: StorageConfig, table_name: str) -> list[str]:
    """Stems of the committed files of one table, sorted; temporary and hidden files are left out."""
    filesystem, root = storage.filesystem(output_uri)
    directory = posixpath.join(root, table_name)
    filesystem.invalidate_cache(directory)
    if not filesystem.exists(directory):
        return []
    names = [posixpath.basename(p) for p in filesystem.ls(directory, detail=False)]
    return sorted(n[: -len(".parquet")] for n in names
                  if n.endswith(".parquet") and not n.startswith((".", "_")))


def read_table_file(output_uri: str, storage: StorageConfig, table_name: str, stem: str,
                    columns: list[str] | None = None) -> pa.Table:
    filesystem, path = _table_path(output_uri, storage, table_name, stem)
    return pq.read_table(pa.BufferReader(filesystem.cat_file(path)), columns=columns)  # one GET, no HEAD first


def read_table_files(output_uri: str, storage: StorageConfig, table_name: str, stems: list[str],
                     columns: list[str] | None = None) -> list[pa.Table]:
    """The files `stems` of one table (only `columns`), read by a pool of threads, in the order of `stems`."""
    if len(stems) <= 1:
        return [read_table_file(output_uri, storage, table_name, stem, columns) for stem in stems]
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(stems))) as pool:
        return list(pool.map(lambda stem: read_table_file(output_uri, storage, table_name, stem, columns), stems))


def remove_table_file(output_uri: str, storage: StorageConfig, table_name: str, stem: str) -> None:
    filesystem, path = _table_path(output_uri, storage, table_name, stem)
    try:
        filesystem.rm_file(path)
    except FileNotFoundError:
        pass


def remove_partial_files(output_uri: str, storage: StorageConfig) -> list[str]:
    """Deletes leftovers of an interrupted run: temporary files, and segments files whose images file was never
    written (their batch never committed). Returns what it removed. Not safe while another job writes here."""
    filesystem, root = storage.filesystem(output_uri)
    removed = []
    for table_name in (SEGMENTS_DIR, IMAGES_DIR):
        directory = posixpath.join(root, table_name)
        filesystem.invalidate_cache(directory)
        if not filesystem.exists(directory):
            continue
        for path in filesystem.ls(directory, detail=False):
            if posixpath.basename(path).startswith(_TEMP_PREFIX):
                filesystem.rm_file(path)
                removed.append(path)
    committed = set(list_stems(output_uri, storage, IMAGES_DIR))
    for stem in list_stems(output_uri, storage, SEGMENTS_DIR):
        if stem not in committed:
            remove_table_file(output_uri, storage, SEGMENTS_DIR, stem)
            removed.append(join_uri(output_uri, SEGMENTS_DIR, f"{stem}.parquet"))
    return removed


def write_json(output_uri: str, storage: StorageConfig, name: str, text: str) -> str:
    """Writes a small text file at the output root (report.json), atomically where the storage allows."""
    filesystem, root = storage.filesystem(output_uri)
    path = posixpath.join(root, name)
    if is_local_uri(output_uri):
        os.makedirs(root, exist_ok=True)
        temporary = os.path.join(root, f"{_TEMP_PREFIX}{uuid.uuid4().hex}-{name}")
        with open(temporary, "w") as handle:
            handle.write(text)
        os.replace(temporary, path)
    else:
        with filesystem.open(path, "w") as handle:
            handle.write(text)
    return join_uri(output_uri, name)
