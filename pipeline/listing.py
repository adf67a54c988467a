"""Input URI -> the ordered list of image objects to label.

An input is a folder (local path, `file://`, `s3://bucket/prefix`, any fsspec URI), a single image, or a
manifest: a Parquet, CSV or text file listing the objects, which is how millions of objects are handed over
without listing a bucket. Folders are filtered by extension and sorted by path; manifests keep their own
order and every entry counts as an input (an entry that is not an image becomes an error row, not a silent
skip). Duplicates are dropped, keeping the first.
"""
from __future__ import annotations

import io
import os
import posixpath

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.records import LISTED_SCHEMA
from pipeline.storage import StorageConfig, is_local_uri, protocol_of

__all__ = ["IMAGE_EXTENSIONS", "MANIFEST_EXTENSIONS", "list_inputs"]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MANIFEST_EXTENSIONS: tuple[str, ...] = (".parquet", ".csv", ".txt")
_URI_COLUMN_NAMES = ("image_uri", "uri", "url", "path")


def list_inputs(input_uri: str, storage: StorageConfig, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                limit: int | None = None) -> pa.Table:
    """The inputs behind `input_uri` as a table (image_uri, image_id) in a stable order.

    image_uri is canonical (absolute local path, or `protocol://path`); image_id is the path relative to the
    input folder, or the manifest's `image_id` column, or the image_uri itself.
    """
    filesystem, path = storage.filesystem(input_uri)
    if not filesystem.exists(path):
        raise FileNotFoundError(f"--input {input_uri} does not exist; give a folder, an image or a manifest "
                                f"({', '.join(MANIFEST_EXTENSIONS)})")
    wanted = tuple(e.lower() for e in extensions)
    if filesystem.isdir(path):
        uris, image_ids = _list_folder(filesystem, path, input_uri, wanted)
    elif path.lower().endswith(MANIFEST_EXTENSIONS):
        uris, image_ids = _read_manifest(filesystem, path, input_uri)
    elif path.lower().endswith(wanted):
        uris, image_ids = [_canonical_uri(input_uri, path)], [posixpath.basename(path)]
    else:
        raise ValueError(f"--input {input_uri} is a file but neither an image ({', '.join(wanted)}) nor a "
                         f"manifest ({', '.join(MANIFEST_EXTENSIONS)})")
    uris, image_ids = _drop_duplicates(uris, image_ids)
    if limit is not None:
        uris, image_ids = uris[:limit], image_ids[:limit]
    return pa.table({"image_uri": uris, "image_id": image_ids}, schema=LISTED_SCHEMA)


def _canonical_uri(input_uri: str, path: str) -> str:
    if is_local_uri(input_uri):
        return os.path.abspath(path)
    return f"{protocol_of(input_uri)}://{path}"


def _list_folder(filesystem, path: str, input_uri: str, extensions: tuple[str, ...]) -> tuple[list, list]:
    root = path.rstrip("/")
    found = sorted(p for p in filesystem.find(root)
                   if p.lower().endswith(extensions) and not posixpath.basename(p).startswith("."))
    uris = [_canonical_uri(input_uri, p) for p in found]
    image_ids = [posixpath.relpath(p, root) for p in found]
    return uris, image_ids


def _read_manifest(filesystem, path: str, input_uri: str) -> tuple[list, list]:
    with filesystem.open(path, "rb") as handle:
        raw = handle.read()
    lowered = path.lower()
    if lowered.endswith(".txt"):
        entries = [line.strip() for line in raw.decode("utf-8").splitlines()]
        table = pa.table({"image_uri": [e for e in entries if e and not e.startswith("#")]})
    elif lowered.endswith(".csv"):
        table = pa_csv.read_csv(io.BytesIO(raw))
    else:
        table = pq.read_table(io.BytesIO(raw))
    uri_column = _manifest_uri_column(table, input_uri)
    manifest_dir = posixpath.dirname(path)
    uris = [_resolve_manifest_entry(str(entry), manifest_dir, input_uri)
            for entry in table.column(uri_column).to_pylist() if entry is not None and str(entry).strip()]
    if "image_id" in table.column_names and uri_column != "image_id":
        ids = [str(i) for i, e in zip(table.column("image_id").to_pylist(), table.column(uri_column).to_pylist())
               if e is not None and str(e).strip()]
    else:
        ids = list(uris)
    return uris, ids


def _manifest_uri_column(table: pa.Table, input_uri: str) -> str:
    for name in _URI_COLUMN_NAMES:
        if name in table.column_names:
            return name
    string_columns = [f.name for f in table.schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    if len(table.column_names) == 1 and string_columns:
        return string_columns[0]
    raise ValueError(f"manifest {input_uri} has columns {table.column_names}; name the column of image URIs "
                     f"one of {list(_URI_COLUMN_NAMES)}")


def _resolve_manifest_entry(entry: str, manifest_dir: str, input_uri: str) -> str:
    """Entries with a scheme or an absolute local path stand as they are; relative ones sit beside the manifest."""
    entry = entry.strip()
    if "://" in entry:
        return os.path.abspath(entry[len("file://"):]) if entry.startswith("file://") else entry
    if is_local_uri(input_uri):
        return os.path.abspath(os.path.join(manifest_dir, entry))
    if entry.startswith("/"):
        return f"{protocol_of(input_uri)}://{entry.lstrip('/')}"
    return f"{protocol_of(input_uri)}://{posixpath.join(manifest_dir, entry)}"


def _drop_duplicates(uris: list, image_ids: list) -> tuple[list, list]:
    seen: set = set()
    kept_uris, kept_ids = [], []
    for uri, image_id in zip(uris, image_ids):
        if uri in seen:
            continue
        seen.add(uri)
        kept_uris.append(uri)
        kept_ids.append(image_id)
    return kept_uris, kept_ids
